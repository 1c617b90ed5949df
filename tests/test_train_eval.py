"""`bigseg eval`: a folder with only a test split, and fp32 scoring on the CPU with the report beside
the model."""
import json

import numpy as np
import pytest

from bigseg.errors import DatasetError
from bigseg.train.data import open_split
from tests.cli_helpers import run_cli
from tests.conftest import make_generic_dataset


def test_eval_takes_a_folder_with_only_a_test_split(tmp_path, tiny_checkpoint, capsys):
    import cv2

    root = tmp_path / "camvid-test"
    for d in ("test", "testannot"):
        (root / d).mkdir(parents=True)
    cv2.imwrite(str(root / "test" / "a.png"), np.zeros((64, 64, 3), np.uint8))
    cv2.imwrite(str(root / "testannot" / "a.png"), np.zeros((64, 64), np.uint8))
    assert len(open_split(root, "test")) == 1
    with pytest.raises(DatasetError, match="needs train/ and trainannot/"):
        open_split(root, "train")


def test_eval_scores_in_fp32_on_the_cpu_and_keeps_its_report_beside_the_model_not_here(
        tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """As training validates (fp32 on the CPU), whatever bf16 units the CPU has; no file appears
    in the working folder unasked."""
    import shutil

    from bigseg.infer import choose

    monkeypatch.delenv("BIGSEG_PRECISION")  # the tests pin fp32; here eval's own default decides
    monkeypatch.setattr(choose, "native_bf16", lambda: True)
    monkeypatch.chdir(tmp_path)
    data = make_generic_dataset(tmp_path / "data", n=4)
    model = tmp_path / "run" / "best.pt"
    model.parent.mkdir()
    shutil.copy(tiny_checkpoint, model)
    code, out, err = run_cli(capsys, "eval", "--data", data, "--model", model, "--device", "cpu", "--engine", "torch")
    assert code == 0, err
    assert "(float32, cpu; report: " in out and not list(tmp_path.glob("eval-*.json"))
    report = json.loads((tmp_path / "run" / "best.eval-val.json").read_text())
    assert report["precision"] == "float32"
    code, out, err = run_cli(capsys, "eval", "--data", data, "--model", model, "--device", "cpu", "--engine", "torch",
                             "--precision", "bf16", "-o", tmp_path / "bf16.json")
    assert code == 0 and json.loads((tmp_path / "bf16.json").read_text())["precision"] == "bfloat16"
