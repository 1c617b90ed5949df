"""Training settings that are wrong on their own are refused before any work, each in one line that
names its option: one table over the settings check, and the command line's rendering of it once."""
import pytest

from bigseg.cli.options import flag
from bigseg.errors import TrainingError
from bigseg.train.setup import check_settings
from tests.cli_helpers import run_cli
from tests.conftest import make_generic_dataset, tiny_config

REFUSED = [  # (settings, the line the command prints)
    (dict(epochs=0), "--epochs must be at least 1, got 0"),
    (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
    (dict(crop=8), "--crop must be at least 16 pixels, got 8"),
    (dict(crop=100), "--crop 100 is not a multiple of 64: the model pads it to 128 and pays for 128; use 128 or 64"),
    (dict(crop_schedule=((96, 0.5),)), "--crop-schedule 96 is not a multiple of 64"),
    (dict(scale_min=2.0, scale_max=1.0), "--scale-min and --scale-max must satisfy 0 < min <= max <= 8, got 2.0 and 1.0"),
    (dict(jitter=1.2), "--jitter must be at least 0 and below 1, got 1.2"),
    (dict(colour_jitter=1.2), "--colour-jitter must be at least 0 and below 1, got 1.2"),
    (dict(gamma=-0.1), "--gamma must be at least 0 and below 1, got -0.1"),
    (dict(optimizer="lamb"), "--optimizer must be adam, adamw or sgd, got 'lamb'"),
    (dict(schedule="step"), "--schedule must be cosine or poly, got 'step'"),
    (dict(lr=0.0), "--lr must be above 0, got 0.0"),
    (dict(class_balance="inverse"), "--class-balance must be one of"),
    (dict(lovasz=20.0), "--lovasz is a loss weight from 0 to 10, got 20.0"),
    (dict(rare_class_sampling=-1.0), "--rare-class-sampling is a temperature from 0 (off) to 10, got -1.0"),
    (dict(scene_balance=2.0), "--scene-balance is from 0 (scenes drawn by area) to 1 (every scene alike), got 2.0"),
    (dict(freeze_bn=True), "--freeze-bn keeps a trained model's batchnorm statistics: it needs --init"),
    (dict(ema=1.0), "--ema is a decay per step, at least 0 (off) and below 1, got 1.0"),
    (dict(val_scales=(5.0,)), "--val-scales must be factors between 0.1 and 4, got (5.0,)"),
    (dict(teacher="t.pt", distil=0.0), "--distil is a loss weight above 0 and at most 10, got 0.0"),
    (dict(teacher="t.pt", data_on_device=True), "--teacher reads the teacher's targets from the run folder"),
    (dict(teacher="t.pt", teacher_scales=(0.05,)), "--teacher-scales must be factors between 0.1 and 4"),
    (dict(teacher_reduction=0), "--teacher-reduction must be at least 1, got 0"),
    (dict(eval_every=-1), "--eval-every must be 0 (never) or more, got -1"),
    (dict(recompute_bn=-1), "--recompute-bn must be 0 (off) or more, got -1"),
    (dict(workers=-1), "--workers must be 0 or more, got -1"),
    (dict(windows_per_epoch=0), "--windows-per-epoch must be at least 1, got 0"),
    (dict(max_steps=-1), "--max-steps must be 0 or more, got -1"),
    (dict(val_block=32), "--val-block must be at least 64 pixels, got 32"),
    (dict(val_buffer=-1), "--val-buffer must be 0 or more pixels, got -1"),
    (dict(pixel_size=0.0), "--pixel-size must be a ground pixel size in metres above 0, got 0.0"),
]


@pytest.mark.parametrize("settings,line", REFUSED, ids=[line.split()[0] + "=" + str(list(s.values())[-1])
                                                        for s, line in REFUSED])
def test_each_setting_wrong_on_its_own_is_refused_in_one_line_naming_its_option(settings, line):
    with pytest.raises(TrainingError) as refused:
        check_settings(tiny_config("data", "run", **settings))
    assert f"{flag(refused.value.param)} {refused.value.reason}".startswith(line)


def test_the_settings_in_the_table_are_the_ones_the_check_refuses_and_sane_ones_pass():
    check_settings(tiny_config("data", "run"))
    check_settings(tiny_config("data", "run", init="a.pt", freeze_bn=True, teacher="t.pt", ema=0.99, lovasz=1.0))


def test_the_command_line_refuses_before_training_and_writes_nothing(tmp_path, capsys):
    data = make_generic_dataset(tmp_path / "data", n=4)
    for args, line in ((("--jitter", "1.2"), "--jitter must be at least 0 and below 1, got 1.2"),
                       (("--lovasz", "20"), "--lovasz is a loss weight from 0 to 10, got 20")):
        code, _, err = run_cli(capsys, "train", "--data", data, "--run", tmp_path / "s", *args, "--device", "cpu")
        assert code == 1 and line in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists() or not (tmp_path / "s" / "last.pt").exists()
