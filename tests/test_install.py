"""What a new user gets: a wheel that carries the default weights (and predicts from anywhere with
no --model), and a command line that answers user mistakes before torch even loads."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_carries_the_default_weights_and_predicts_without_the_source_tree(tmp_path):
    pytest.importorskip("setuptools")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("bigseg-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"bigseg/weights/ladder-dn121-camvid.pt", "bigseg/weights/manifest.json",
            "bigseg/example_images/street.jpg"} <= names
    site = tmp_path / "site"  # a fresh install location, the source tree nowhere on the path
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "BIGSEG_WEIGHTS"}
    env["PYTHONPATH"] = str(site)
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import bigseg; print(bigseg.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    # the README's first commands, from the wheel alone: the example image, then its prediction
    example = subprocess.run([sys.executable, "-m", "bigseg.examples"], cwd=work, env=env, capture_output=True,
                             text=True, timeout=60)
    assert example.returncode == 0 and "wrote examples/street.jpg" in example.stdout, example.stderr
    assert (work / "examples" / "street.jpg").read_bytes() == (ROOT / "examples" / "street.jpg").read_bytes()
    done = subprocess.run([sys.executable, "-m", "bigseg", "predict", "examples/street.jpg", "--overlay",
                           "--device", "cpu", "--tile", "512"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (work / "street.mask.png").is_file() and (work / "street.overlay.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["predict", "no-such-file.tif"], "input not found"),
    (["predict", "--scales", "big", "x.tif"], "--scales takes factors"),
    (["predict", "--crf", "fancy", "x.tif"], "--crf takes lattice or window"),
    (["eval", "--data", "no-such-folder"], "data not found"),
    (["models"], None),
    (["--help"], None),
])
def test_mistakes_help_and_listing_answer_before_torch_loads(tmp_path, args, message):
    probe = ("import sys\nfrom bigseg.cli import main\nsys.argv = ['bigseg', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch loaded:', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "torch loaded: False" in r.stdout, r.stdout + r.stderr
    if message:
        assert f"Error: {message}" in r.stderr, r.stderr
