"""Running predict jobs: inputs to jobs (`discover`), one file job with its journal (`file_job`,
`journal`), the job loop (`batch`), parts of one raster under torchrun (`shards`) and the dry-run
plan (`plan`)."""
