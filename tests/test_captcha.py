"""bench/captcha_calib.py (rendered captchas for ddddocr's recognizer) and the real recognizer itself."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.cli import main
from onnxprune.runtime.session import make_session, run_session
from onnxprune.testing import checks

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
from captcha_calib import ALPHABET, ctc_decode  # noqa: E402

WHEEL = "ddddocr==1.6.1"


def _one_hot(steps: list[int], classes: int = 6) -> np.ndarray:
    out = np.full((len(steps), 1, classes), -1.0, np.float32)
    for t, k in enumerate(steps):
        out[t, 0, k] = 1.0
    return out


def test_ctc_decode_merges_repeats_and_drops_blanks():
    # greedy CTC: a repeat separated by a blank is two characters, an unbroken repeat one
    assert ctc_decode(_one_hot([0, 3, 3, 0, 3, 5, 5, 0, 0, 2])) == (3, 3, 5, 2)
    assert ctc_decode(_one_hot([0, 0, 0])) == ()
    assert ctc_decode(_one_hot([4, 4, 4, 4])) == (4,)
    assert ctc_decode(_one_hot([1, 2, 1, 2])) == (1, 2, 1, 2)


def _render(tmp_path: Path, name: str, n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, str(BENCH / "captcha_calib.py"), "--out", str(out), "--images", str(n),
                           "--seed", str(seed)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("no DejaVu fonts" in proc.stderr or "needs Pillow" in proc.stderr):
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as z:
        x = z["input1"]
    return x, json.loads(Path(f"{out}.labels.json").read_text())


def test_captchas_are_reproducible_preprocessed_and_labelled(tmp_path):
    x, texts = _render(tmp_path, "a", 12)
    y, again = _render(tmp_path, "b", 12)
    z, other = _render(tmp_path, "c", 12, seed=1)
    assert x.shape == (12, 1, 64, 160) and x.dtype == np.float32
    assert np.array_equal(x, y) and texts == again
    assert texts != other and not np.array_equal(x, z)
    assert all(4 <= len(t) <= 5 and set(t) <= set(ALPHABET) for t in texts)
    # ddddocr's preprocessing: greyscale / 255, light backgrounds with dark text on them
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert all(np.median(img) > 0.6 and img.min() < 0.5 for img in x)


@pytest.fixture(scope="module")
def ddddocr(tmp_path_factory) -> tuple[Path, list[str]]:
    """ddddocr's recognizer and its charset, from the wheel on the package registry."""
    d = tmp_path_factory.mktemp("ddddocr")
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(d), WHEEL],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("downloading the ddddocr wheel timed out (offline?)")
    wheels = list(d.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"the ddddocr wheel could not be fetched (offline?): {proc.stderr.strip()[:200]}")
    with zipfile.ZipFile(wheels[0]) as z:
        (d / "common.onnx").write_bytes(z.read("ddddocr/common.onnx"))
        src = z.read("ddddocr/models/charset_manager.py").decode()
    charset = next(ast.literal_eval(f.body[-1].value) for f in ast.walk(ast.parse(src))
                   if isinstance(f, ast.FunctionDef) and f.name == "_get_beta_charset")
    return d / "common.onnx", charset


def _reads(model, x: np.ndarray) -> list[tuple[int, ...]]:
    sess = make_session(model, "cpu")[0]
    return [ctc_decode(run_session(sess, {"input1": x[i:i + 1]})[0]) for i in range(len(x))]


@pytest.mark.network
def test_ddddocr_reads_the_rendered_captchas(ddddocr, tmp_path):
    """The data is in the model's domain: the unpruned recognizer reads (nearly) all of them, as
    ddddocr's own client would (greedy CTC over its beta charset, case ignored)."""
    path, charset = ddddocr
    x, texts = _render(tmp_path, "c", 60)
    read = ["".join(charset[k] for k in r) for r in _reads(str(path), x)]
    right = sum(r.lower() == t.lower() for r, t in zip(read, texts, strict=True))
    assert right >= 0.9 * len(texts), list(zip(read, texts, strict=True))


@pytest.mark.slow  # two prunes of a 13.5M-parameter model, one calibrated: minutes on 2 cores
@pytest.mark.network
def test_ddddocr_prunes_exactly_and_calibration_keeps_more_readings(ddddocr, tmp_path):
    """A PyTorch export with a convolutional encoder feeding an LSTM (whose declared output shape [1, T]
    is not what it returns, [T, 1, 8210]): pruned and verified against the masked original; with
    calibration captchas the pruned model reads more held-out captchas as the original does than
    without."""
    path, _ = ddddocr
    x, _ = _render(tmp_path, "c", 160)
    calib, held = tmp_path / "calib.npz", x[100:]
    np.savez(calib, input1=x[:100])
    common = ["--ratio", "0.2", "--input-shape", "input1=1x1x64x160", "--ep", "cpu"]
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(out), "--verify", "--report", str(report), *common]) == 0
    rep = json.loads(report.read_text())
    checks.assert_report_verified(rep, 1e-4)
    assert rep["stats"]["pruned"]["macs"] < 0.8 * rep["stats"]["original"]["macs"]
    onnx.checker.check_model(onnx.load(out), full_check=True)
    cal = tmp_path / "pc.onnx"
    assert main(["prune", str(path), "-o", str(cal), "--calib", str(calib), *common]) == 0
    ref = _reads(str(path), held)
    plain = sum(a == b for a, b in zip(_reads(str(out), held), ref, strict=True))
    calibrated = sum(a == b for a, b in zip(_reads(str(cal), held), ref, strict=True))
    assert calibrated > plain, (plain, calibrated)
