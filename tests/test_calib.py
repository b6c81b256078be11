"""Calibration data (runtime/calib.py), activation capture (runtime/capture.py) and held-out fidelity
(measure/fidelity.py), and their wiring into ``onnxprune prune --calib``.

Bad calibration input: one test per case, through the in-process CLI, each asserting exit 2, one
``onnxprune: error:`` line and no file written. The data forms (.npz stored and compressed, .npy,
folders, images) load the same samples; the split is disjoint and deterministic; capture's streamed
statistics equal numpy's over the full activations (read with onnxruntime directly, every sample in
one run); batch sizes follow the byte budget on a memory-mapped .npy larger than it; fidelity metrics
equal numpy values computed by hand.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.errors import UserError
from onnxprune.measure.fidelity import measure_fidelity
from onnxprune.runtime import calib as calib_mod
from onnxprune.runtime.calib import CalibSpec, ImageSpec, open_calib, split
from onnxprune.runtime.capture import batch_size, capture
from onnxprune.testing import from_text
from onnxprune.testing.graphs import MLP

try:
    from PIL import Image as PIL
except ImportError:  # only the image tests need Pillow
    PIL = None
needs_pillow = pytest.mark.skipif(PIL is None, reason="--calib-images needs Pillow (onnxprune[images])")


CNN = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[N,3,8,8] x) => (float[N,4] y)
<float[8,3,3,3] w1, float[8] b1, float[4,8] wf, float[4] bf>
{
  c = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r = Relu (c)
  p = GlobalAveragePool (r)
  f = Flatten (p)
  y = Gemm <transB=1> (f, wf, bf)
}
"""

TWO = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[N,8] a, float[N,8] b) => (float[N,5] y)
<float[16,8] w1, float[16] b1, float[5,16] w2>
{
  s = Add (a, b)
  h = Gemm <transB=1> (s, w1, b1)
  r = Relu (h)
  y = MatMul (r, w2t)
  w2t = Transpose (w2)
}
"""

FIXED4 = """
<ir_version: 8, opset_import: ["" : 17]>
fixed (float[4,8] x) => (float[4,5] y)
<float[16,8] w1, float[16] b1, float[5,16] w2, float[5] b2>
{
  h = Gemm <transB=1> (x, w1, b1)
  r = Relu (h)
  y = Gemm <transB=1> (r, w2, b2)
}
"""


def _save(tmp_path: pathlib.Path, text: str, name: str) -> pathlib.Path:
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    p = d / f"{name}.onnx"
    onnx.save(from_text(text), str(p))
    return p


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _x(n: int, *shape: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return _rng(seed).standard_normal((n, *shape)).astype(dtype)


def _listing(d: pathlib.Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _assert_refused(proc, out_dir: pathlib.Path, *words: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), proc.stderr
    assert _listing(out_dir) == [], "a file was written"
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


@pytest.fixture
def mlp(tmp_path):
    return _save(tmp_path, MLP, "mlp")


@pytest.fixture
def prune_calib(run_main, out_dir):
    """Run ``prune MODEL -o out/o.onnx --report out/r.json ARGS`` in process."""

    def run(model, *args):
        return run_main("prune", model, "-o", out_dir / "o.onnx", "--report", out_dir / "r.json", *args)

    return run


# ----------------------------------------------------------------------------------------------
# 1. bad calibration input: exit 2, one line, nothing written


def test_unknown_input_name(prune_calib, mlp, tmp_path, out_dir):
    np.savez(tmp_path / "c.npz", x=_x(10, 8), z=_x(10, 8))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npz"), out_dir, "'z'", "not a graph input")


def test_missing_input_name(prune_calib, tmp_path, out_dir):
    two = _save(tmp_path, TWO, "two")
    np.savez(tmp_path / "c.npz", a=_x(10, 8))
    _assert_refused(prune_calib(two, "--calib", tmp_path / "c.npz"), out_dir, "no array for input 'b'")


def test_wrong_dtype(prune_calib, mlp, tmp_path, out_dir):
    np.savez(tmp_path / "c.npz", x=_x(10, 8, dtype=np.float64))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npz"), out_dir, "float64", "float32")


def test_wrong_rank(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(10, 8, 1))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy"), out_dir, "rank 3", "rank 2")


def test_wrong_fixed_dim(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(10, 7))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy"), out_dir, "dim 1 is 7", "fixes it to 8")


def test_one_sample_is_too_few(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(1, 8))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy"), out_dir, "1 sample", "at least 2")


def test_calib_samples_one_is_too_few(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(10, 8))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy", "--calib-samples", "1"), out_dir, "at least 2")


def test_holdout_leaving_nothing_to_fit(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(2, 8))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy", "--holdout", "0.9"), out_dir, "nothing to fit")


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "abc"])
def test_holdout_out_of_range(prune_calib, mlp, tmp_path, out_dir, value):
    np.save(tmp_path / "c.npy", _x(10, 8))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy", "--holdout", value), out_dir, "--holdout")


def test_fixed_batch_without_a_whole_batch_held_out(prune_calib, tmp_path, out_dir):
    model = _save(tmp_path, FIXED4, "fixed")
    np.save(tmp_path / "c.npy", _x(10, 8))  # 2 held out, fewer than the model's batch of 4
    _assert_refused(prune_calib(model, "--calib", tmp_path / "c.npy"), out_dir, "batch to 4")


def test_inputs_with_different_sample_counts(prune_calib, tmp_path, out_dir):
    two = _save(tmp_path, TWO, "two")
    np.savez(tmp_path / "c.npz", a=_x(10, 8), b=_x(9, 8))
    _assert_refused(prune_calib(two, "--calib", tmp_path / "c.npz"), out_dir, "different numbers of samples")


def test_npy_for_a_two_input_model(prune_calib, tmp_path, out_dir):
    two = _save(tmp_path, TWO, "two")
    np.save(tmp_path / "c.npy", _x(10, 8))
    _assert_refused(prune_calib(two, "--calib", tmp_path / "c.npy"), out_dir, ".npy", "2 inputs")


def test_corrupt_npz(prune_calib, mlp, tmp_path, out_dir):
    (tmp_path / "c.npz").write_bytes(_rng().integers(0, 256, 4000, dtype=np.uint8).tobytes())
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npz"), out_dir, "not a valid .npz")


def test_corrupt_npy_header(prune_calib, mlp, tmp_path, out_dir):
    (tmp_path / "c.npy").write_bytes(b"\x93NUMPY\x01\x00garbage" + bytes(200))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy"), out_dir, "not a valid .npy")


def test_truncated_npy(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(10, 8))
    data = (tmp_path / "c.npy").read_bytes()
    (tmp_path / "c.npy").write_bytes(data[:-100])
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy"), out_dir, "truncated")


def test_corrupt_compressed_data_found_when_read(prune_calib, mlp, tmp_path, out_dir):
    """The header is intact, the deflated data is not: found when the batch is read, still one line
    and nothing written (the pruned model is only saved after fidelity)."""
    p = tmp_path / "c.npz"
    np.savez_compressed(p, x=_x(50, 8))
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 64):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))
    _assert_refused(prune_calib(mlp, "--calib", p), out_dir, "c.npz")


def test_pickled_object_array(prune_calib, mlp, tmp_path, out_dir):
    arr = np.empty((10, 8), dtype=object)
    arr[:] = 1.0
    np.save(tmp_path / "c.npy", arr, allow_pickle=True)
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy"), out_dir, "pickle")


def test_pickled_object_array_in_npz(prune_calib, mlp, tmp_path, out_dir):
    arr = np.empty((10, 8), dtype=object)
    arr[:] = 1.0
    np.savez(tmp_path / "c.npz", x=arr)
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npz"), out_dir, "pickle")


def test_empty_folder(prune_calib, mlp, tmp_path, out_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not data\n")
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "empty"), out_dir, "no .npz or .npy")


def test_folder_files_that_do_not_concatenate(prune_calib, tmp_path, out_dir):
    dyn = _save(tmp_path, MLP.replace("float[N,8] x", "float[N,K] x").replace("(x, w1, b1)", "(xs, w1, b1)")
                .replace("{\n", "{\n  xs = Slice (x, st, en, ax)\n", 1)
                .replace("<float[16,8] w1", "<int64[1] st = {0}, int64[1] en = {8}, int64[1] ax = {1}, float[16,8] w1"),
                "dyn")
    d = tmp_path / "parts"
    d.mkdir()
    np.save(d / "a.npy", _x(5, 8))
    np.save(d / "b.npy", _x(5, 9))
    _assert_refused(prune_calib(dyn, "--calib", d), out_dir, "cannot be concatenated")


def test_no_such_calibration_file(prune_calib, mlp, tmp_path, out_dir):
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "nope.npz"), out_dir, "no such calibration")


def test_not_an_array_file(prune_calib, mlp, tmp_path, out_dir):
    (tmp_path / "c.csv").write_text("1,2,3\n")
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.csv"), out_dir, ".npz, .npy")


def test_calib_and_calib_images_together(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(10, 8))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy", "--calib-images", tmp_path), out_dir, "not both")


def test_image_option_without_images(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(10, 8))
    _assert_refused(prune_calib(mlp, "--calib", tmp_path / "c.npy", "--mean", "0.5,0.5,0.5"), out_dir,
                    "--mean", "--calib-images")


def test_holdout_without_calibration_data(prune_calib, mlp, out_dir):
    _assert_refused(prune_calib(mlp, "--holdout", "0.3"), out_dir, "--holdout needs calibration data")


@pytest.mark.parametrize("flag,value", [("--image-size", "16"), ("--mean", "1,2"), ("--std", "a,b,c"),
                                        ("--image-size", "0,4")])
def test_bad_image_option_values(prune_calib, small_onnx, tmp_path, out_dir, flag, value):
    _assert_refused(prune_calib(small_onnx, "--calib-images", tmp_path, flag, value), out_dir, flag)


@needs_pillow
def test_images_for_a_model_without_an_image_input(prune_calib, mlp, tmp_path, out_dir):
    d = _images(tmp_path, 4, 16, 16)
    _assert_refused(prune_calib(mlp, "--calib-images", d), out_dir, "rank-4")


@needs_pillow
def test_image_folder_without_images(prune_calib, small_onnx, tmp_path, out_dir):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.txt").write_text("x")
    _assert_refused(prune_calib(small_onnx, "--calib-images", d), out_dir, "holds no images")


@needs_pillow
def test_corrupt_image(prune_calib, small_onnx, tmp_path, out_dir):
    d = _images(tmp_path, 4, 16, 16)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    _assert_refused(prune_calib(small_onnx, "--calib-images", d), out_dir, "broken.png")


@needs_pillow
def test_images_without_pillow_say_what_they_need(prune_calib, small_onnx, tmp_path, out_dir, monkeypatch):
    d = _images(tmp_path, 4, 16, 16)
    monkeypatch.setattr(calib_mod, "Image", None)
    _assert_refused(prune_calib(small_onnx, "--calib-images", d), out_dir, "pillow")


@needs_pillow
def test_images_of_three_channels_for_a_one_channel_model(prune_calib, tmp_path, out_dir):
    gray = _save(tmp_path, CNN.replace("float[N,3,8,8] x", "float[N,1,8,8] x").replace("float[8,3,3,3] w1",
                                                                                     "float[8,1,3,3] w1"), "gray")
    d = _images(tmp_path, 4, 8, 8)
    _assert_refused(prune_calib(gray, "--calib-images", d), out_dir, "dim 1 is 3", "fixes it to 1")


# ----------------------------------------------------------------------------------------------
# 2. forms, split


def _images(tmp_path: pathlib.Path, n: int, h: int, w: int, seed: int = 0) -> pathlib.Path:
    d = tmp_path / "imgs"
    d.mkdir(exist_ok=True)
    px = _rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        PIL.fromarray(px[i], "RGB").save(d / f"img{i:03d}.png")
    np.save(tmp_path / "pixels.npy", px)
    return d


def _all(view) -> dict[str, np.ndarray]:
    parts = [b.feeds for b in view.batches(3)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_split_is_disjoint_deterministic_and_sized():
    fit, hold = split(100, 0.2, seed=3)
    assert len(hold) == 20 and len(fit) == 80
    assert not set(fit) & set(hold) and set(fit) | set(hold) == set(range(100))
    assert list(fit) == sorted(fit) and list(hold) == sorted(hold)
    fit2, hold2 = split(100, 0.2, seed=3)
    assert np.array_equal(fit, fit2) and np.array_equal(hold, hold2)
    _, hold3 = split(100, 0.2, seed=4)
    assert not np.array_equal(hold, hold3)  # the seed decides
    fit4, hold4 = split(100, 0.25, seed=3, samples=40)
    assert len(fit4) + len(hold4) == 40 and len(hold4) == 10 and not set(fit4) & set(hold4)
    assert split(7, 0.2)[1].size == math.ceil(0.2 * 7)


def test_views_hold_exactly_their_samples(tmp_path):
    x = _x(30, 8)
    np.save(tmp_path / "c.npy", x)
    data = open_calib(from_text(MLP), CalibSpec(path=str(tmp_path / "c.npy"), seed=5))
    fit, hold = split(30, 0.2, seed=5)
    assert np.array_equal(_all(data.fit)["x"], x[fit])
    assert np.array_equal(_all(data.holdout)["x"], x[hold])
    assert data.to_json()["holdout"] == 6 and data.to_json()["fit"] == 24


def test_npz_npy_folders_stored_and_compressed_load_the_same(tmp_path):
    x = _x(23, 8)
    np.savez(tmp_path / "stored.npz", x=x)
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    np.save(tmp_path / "one.npy", x)
    np.save(tmp_path / "fortran.npy", np.asfortranarray(x))
    npz_dir, npy_dir = tmp_path / "npz_parts", tmp_path / "npy_parts"
    npz_dir.mkdir()
    npy_dir.mkdir()
    for i, (a, b) in enumerate([(0, 7), (7, 8), (8, 23)]):
        np.savez_compressed(npz_dir / f"part{i}.npz", x=x[a:b])
        np.save(npy_dir / f"part{i}.npy", x[a:b])
    model = from_text(MLP)
    ref = None
    for path in ("stored.npz", "packed.npz", "one.npy", "fortran.npy", "npz_parts", "npy_parts"):
        data = open_calib(model, CalibSpec(path=str(tmp_path / path)))
        got = (_all(data.fit)["x"], _all(data.holdout)["x"])
        if ref is None:
            ref = got
            fit, hold = split(23, 0.2)
            assert np.array_equal(ref[0], x[fit]) and np.array_equal(ref[1], x[hold])
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]), path
        assert data.fit.read(0, 3).feeds["x"].flags.c_contiguous, path


@needs_pillow
@pytest.mark.parametrize("layout,channels", [("nchw", "rgb"), ("nhwc", "bgr")])
def test_images_load_as_their_preprocessed_pixels(tmp_path, layout, channels):
    d = _images(tmp_path, 9, 6, 5)
    px = np.load(tmp_path / "pixels.npy").astype(np.float32) / 255.0  # N, H, W, RGB
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    order = [0, 1, 2] if channels == "rgb" else [2, 1, 0]
    want = (px[..., order] - np.asarray(mean, np.float32)[order]) / np.asarray(std, np.float32)[order]
    if layout == "nchw":
        want = want.transpose(0, 3, 1, 2)
    shape = "float[N,3,6,5] x" if layout == "nchw" else "float[N,6,5,3] x"
    model = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
        m ({shape}) => (float[N] y) {{ y = ReduceSum <keepdims=0> (x, ax) }}""".replace(
        "{ y", "<int64[3] ax = {1, 2, 3}> { y"))
    data = open_calib(model, CalibSpec(images=ImageSpec(str(d), None, mean, std, layout, channels)))
    fit, hold = split(9, 0.2)
    np.testing.assert_allclose(_all(data.fit)["x"], want[fit], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_all(data.holdout)["x"], want[hold], rtol=1e-6, atol=1e-6)
    # the same pixels as a .npy load the same samples
    np.save(tmp_path / "same.npy", want.astype(np.float32))
    same = open_calib(model, CalibSpec(path=str(tmp_path / "same.npy")))
    np.testing.assert_allclose(_all(same.holdout)["x"], _all(data.holdout)["x"], rtol=1e-6, atol=1e-6)


def test_fixed_batch_runs_exactly_its_batch(tmp_path):
    np.save(tmp_path / "c.npy", _x(30, 8))
    model = from_text(FIXED4)
    data = open_calib(model, CalibSpec(path=str(tmp_path / "c.npy")))
    assert data.holdout.n == 4 and data.fit.n == 24  # 6 -> 4 and 24 (multiples of 4)
    cap = capture(model, [("h", 1)], data.fit, ep="cpu", budget_bytes=10**9)
    assert set(cap.batches) == {4} and sum(cap.batches) == 24


# ----------------------------------------------------------------------------------------------
# 3. capture


def _full_activations(model: onnx.ModelProto, names: list[str], feeds: dict) -> dict[str, np.ndarray]:
    """The tensors with every sample in one run, by onnxruntime directly (independent of capture)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _numpy_stats(a: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    a = np.moveaxis(a.astype(np.float64), axis, -1).reshape(-1, a.shape[axis])
    return a.shape[0], a.mean(0), np.abs(a).mean(0), (a * a).mean(0)


def test_capture_statistics_equal_numpy_on_the_full_activations(tmp_path):
    model = from_text(CNN)
    x = _x(37, 3, 8, 8)
    np.save(tmp_path / "c.npy", x)
    data = open_calib(model, CalibSpec(path=str(tmp_path / "c.npy")))
    taps = [("c", 1), ("r", 1), ("f", -1), ("x", 1)]
    cap = capture(model, taps, data.fit, ep="cpu", budget_bytes=20_000)
    assert len(cap.batches) > 2  # streamed over several runs
    full = _full_activations(model, ["c", "r", "f"], {"x": x[data.fit.indices]})
    full["x"] = x[data.fit.indices]
    for name, axis in taps:
        count, mean, mean_abs, mean_sq = _numpy_stats(full[name], axis)
        st = cap.stats[name]
        assert st.count == count
        np.testing.assert_allclose(st.mean, mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st.mean_abs, mean_abs, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(st.mean_sq, mean_sq, rtol=1e-9, atol=1e-12)
    assert np.all(cap.stats["r"].mean_abs > 0) and np.all(cap.stats["r"].mean >= 0)  # Relu really captured


def test_capture_batches_follow_the_budget_on_a_mapped_npy_larger_than_it(tmp_path):
    model = from_text(CNN)
    x = _x(400, 3, 8, 8)  # 400 x 768 bytes = 307 KB on disk
    np.save(tmp_path / "big.npy", x)
    budget = 64 * 1024
    assert (tmp_path / "big.npy").stat().st_size > 4 * budget
    data = open_calib(model, CalibSpec(path=str(tmp_path / "big.npy")))
    cap = capture(model, [("c", 1), ("r", 1)], data.fit, ep="cpu", budget_bytes=budget)
    per_sample = 3 * 8 * 8 * 4 + 2 * 8 * 8 * 8 * 4  # input + two fetched [8, 8, 8] float32 tensors
    assert cap.per_sample_bytes == per_sample
    assert cap.batches[0] == 1  # the measuring run
    assert max(cap.batches) == budget // per_sample == batch_size(per_sample, budget)
    assert cap.peak_bytes <= budget
    assert sum(cap.batches) == data.fit.n
    col = data.columns["x"]
    assert isinstance(col.chunks[0]._map, np.memmap)  # read through the map, rows per batch
    full = _full_activations(model, ["r"], {"x": x[data.fit.indices]})
    np.testing.assert_allclose(cap.stats["r"].mean_sq, _numpy_stats(full["r"], 1)[3], rtol=1e-9)


def test_capture_budget_below_one_sample_runs_one_at_a_time(tmp_path):
    model = from_text(CNN)
    np.save(tmp_path / "c.npy", _x(12, 3, 8, 8))
    data = open_calib(model, CalibSpec(path=str(tmp_path / "c.npy")))
    cap = capture(model, [("c", 1)], data.fit, ep="cpu", budget_bytes=100)
    assert set(cap.batches) == {1} and len(cap.batches) == data.fit.n


def test_row_samples_are_real_rows_and_do_not_depend_on_batching(tmp_path):
    model = from_text(CNN)
    x = _x(21, 3, 8, 8)
    np.save(tmp_path / "c.npy", x)
    data = open_calib(model, CalibSpec(path=str(tmp_path / "c.npy")))
    a = capture(model, [("r", 1)], data.fit, rows={"r": 5}, ep="cpu", budget_bytes=10**8, seed=1)
    b = capture(model, [("r", 1)], data.fit, rows={"r": 5}, ep="cpu", budget_bytes=3000, seed=1)
    assert a.batches != b.batches
    ra, rb = a.rows["r"], b.rows["r"]
    assert ra.rows.shape == (5 * data.fit.n, 8) and ra.rows.dtype == np.float32
    assert np.array_equal(ra.rows, rb.rows) and np.array_equal(ra.sources, rb.sources)
    full = _full_activations(model, ["r"], {"x": x})["r"]  # [N, 8, 8, 8]
    for row, g in zip(ra.rows[::7], ra.sources[::7], strict=True):
        positions = full[g].reshape(8, -1).T  # [64 positions, 8 channels]
        assert np.any(np.all(np.isclose(positions, row, rtol=1e-6, atol=1e-7), axis=1))


def test_capture_of_an_unknown_tensor_is_refused(tmp_path):
    np.save(tmp_path / "c.npy", _x(10, 8))
    model = from_text(MLP)
    data = open_calib(model, CalibSpec(path=str(tmp_path / "c.npy")))
    with pytest.raises(UserError, match="no tensor named 'nope'"):
        capture(model, [("nope", 1)], data.fit, ep="cpu")


def test_capture_reports_progress(tmp_path):
    np.save(tmp_path / "c.npy", _x(30, 8))
    model = from_text(MLP)
    data = open_calib(model, CalibSpec(path=str(tmp_path / "c.npy")))
    seen: list[tuple[int, int]] = []
    capture(model, [("h", 1)], data.fit, ep="cpu", budget_bytes=400, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (data.fit.n, data.fit.n) and [d for d, _ in seen] == sorted(d for d, _ in seen)


# ----------------------------------------------------------------------------------------------
# 4. fidelity


def _linear(w: np.ndarray, tail: str = "", out: str = "float[N,4] y") -> onnx.ModelProto:
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    lin (float[N,3] x) => ({out}) <float[3,4] w> {{ z = MatMul (x, w)
    {tail or "y = Identity (z)"} }}"""
    m = onnx.parser.parse_model(text)
    m.graph.initializer.append(onnx.numpy_helper.from_array(w.astype(np.float32), "w"))
    del m.graph.value_info[:]
    return m


def _hold(tmp_path, x, model):
    np.save(tmp_path / "c.npy", x)
    return open_calib(model, CalibSpec(path=str(tmp_path / "c.npy"), holdout=0.5)).holdout


def test_fidelity_equals_numpy_by_hand(tmp_path):
    rng = _rng(1)
    w, w2 = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    w2[:, :2] = w[:, :2]
    o_model, p_model = _linear(w), _linear(w2)
    x = _x(40, 3, seed=2)
    view = _hold(tmp_path, x, o_model)
    fid = measure_fidelity(o_model, p_model, view, ep="cpu", budget_bytes=200)
    assert len(fid.batches) > 2
    xs = x[view.indices].astype(np.float64)
    o = xs @ w.astype(np.float32).astype(np.float64)
    p = xs @ w2.astype(np.float32).astype(np.float64)
    (f,) = fid.outputs
    assert fid.samples == 20 and f.shape == (4,)
    assert f.rel_error_l2 == pytest.approx(np.linalg.norm(p - o) / np.linalg.norm(o), rel=1e-5)
    cos = np.sum(p * o, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(o, axis=1))
    assert f.cosine == pytest.approx(cos.mean(), rel=1e-5)
    assert f.top1 == pytest.approx(np.mean(p.argmax(1) == o.argmax(1)))
    assert f.positions == 20 and f.match is None
    assert 0 < f.top1 < 1  # the test can tell agreement from disagreement
    assert fid.summary()["min_top1_agreement"] == f.top1


def test_fidelity_of_a_model_with_itself_is_perfect(tmp_path):
    w = _rng(3).standard_normal((3, 4))
    m = _linear(w)
    fid = measure_fidelity(m, m, _hold(tmp_path, _x(10, 3), m), ep="cpu")
    (f,) = fid.outputs
    assert f.rel_error_l2 == 0.0 and f.cosine == pytest.approx(1.0) and f.top1 == 1.0


def test_classifier_rule(tmp_path):
    """[N, T, C] softmax: top-1 over every position; [N, T, C] raw values: none; integer labels: match."""
    w = _rng(4).standard_normal((3, 4))
    seq = "y = Softmax <axis=-1> (zz)\n zz = Reshape (z, sh)"
    probs = _linear(w, seq, "float[N,2,2] y")
    probs.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "sh"))
    raw = _linear(w, "y = Reshape (z, sh)", "float[N,2,2] y")
    raw.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "sh"))
    labels = _linear(w, "y = ArgMax <axis=1, keepdims=0> (z)", "int64[N] y")
    x = _x(12, 3)
    for model, top1, match in ((probs, True, False), (raw, False, False), (labels, False, True)):
        (f,) = measure_fidelity(model, model, _hold(tmp_path, x, model), ep="cpu").outputs
        assert (f.top1 is not None) == top1 and (f.match is not None) == match
        if top1:
            assert f.top1 == 1.0 and f.positions == 6 * 2
        if match:
            assert f.match == 1.0


# ----------------------------------------------------------------------------------------------
# 5. the command line


def test_prune_with_calib_reports_fidelity_and_without_it_nothing_changes(prune_calib, mlp, tmp_path, out_dir):
    np.save(tmp_path / "c.npy", _x(50, 8))
    proc = prune_calib(mlp, "--calib", tmp_path / "c.npy", "--ratio", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "held-out fidelity (10 samples)" in proc.stdout and "top-1 agreement" in proc.stdout
    report = json.loads((out_dir / "r.json").read_text())
    fid = report["fidelity"]
    assert fid["held_out"] == 10 and fid["calibration"]["fit"] == 40
    (o,) = fid["outputs"]
    assert o["name"] == "y" and 0.0 <= o["top1_agreement"] <= 1.0 and o["rel_error_l2"] > 0
    (out_dir / "r.json").unlink()
    (out_dir / "o.onnx").unlink()
    plain = prune_calib(mlp, "--ratio", "0.5")
    assert plain.returncode == 0 and "held-out" not in plain.stdout
    assert "fidelity" not in json.loads((out_dir / "r.json").read_text())


@needs_pillow
def test_prune_with_calib_images(prune_calib, small_onnx, tmp_path, out_dir):
    d = _images(tmp_path, 10, 20, 24)  # resized to the model's 16 x 16
    proc = prune_calib(small_onnx, "--calib-images", d, "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                       "--verify")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out_dir / "r.json").read_text())
    assert report["fidelity"]["held_out"] == 2 and report["verification"]["passed"]
    assert report["fidelity"]["calibration"]["inputs"]["x"]["sample_shape"] == [3, 16, 16]


def test_zoo_model_fidelity_in_the_report(run_cli, resnet18_onnx, tmp_path):
    model = onnx.load(str(resnet18_onnx), load_external_data=False)
    name = model.graph.input[0].name
    np.savez(tmp_path / "calib.npz", **{name: _x(10, 3, 224, 224)})
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("prune", resnet18_onnx, "-o", out / "p.onnx", "--ratio", "0.5", "--calib", tmp_path / "calib.npz",
                   "--report", out / "r.json", "--ep", "cpu", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fid = json.loads((out / "r.json").read_text())["fidelity"]
    assert fid["held_out"] == 2
    (o,) = fid["outputs"]
    assert o["shape"] == [1000] and o["top1_agreement"] is not None and o["top1_positions"] == 2
    assert 0 < o["rel_error_l2"] < float("inf") and -1 <= o["cosine"] <= 1
    assert "top-1 agreement" in proc.stdout
