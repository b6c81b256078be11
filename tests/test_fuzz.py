"""Fuzzing the command-line contract (issue 9, "fuzz test").

Real model files are mutated (seeded, deterministic: ``numpy.random.default_rng(seed)``) and
``onnxprune prune IN -o OUT --ratio 0.5 --verify`` is run in this process through
``onnxprune.cli.main``. Whatever the mutation, the outcome is one of:

- exit 0, a model at OUT that passes ``onnx.checker.check_model(full_check=True)``, last line PASSED;
- exit 1 with the verification FAILED line (or one ``onnxprune: error:`` line), nothing at OUT;
- exit 2/3/4 with exactly one stderr line starting ``onnxprune: error:``, nothing at OUT;

never a traceback (an exception escaping ``main``), never a hang, never a leftover temp file in the
output folder, never a write outside it, never a change to the input files.

Mutation classes: ``truncate`` (cut the file at a random byte), ``flip_raw`` (xor random bytes of
one initializer's raw_data), ``flip_struct`` (xor random bytes of the protobuf outside raw_data),
``bend_dim`` (change one dim of an initializer or of a graph input/output/value_info),
``ext_data`` (a copy saved with external data, one tensor's entry rewritten: ``../x``, an absolute
path, a missing file, a wrong offset, a wrong length).

Replay a failure: the message names source, mutation and seed; ``run_case(SOURCE, MUTATION, SEED,
root)`` reproduces it, or ``python tests/test_fuzz.py SOURCE MUTATION SEED`` (prints None when the
contract holds, else the violation).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import traceback

import numpy as np
import onnx
import pytest

from onnxprune.testing import graphs

ALARM_S = 20
PREFIX = "onnxprune: error:"


# ----------------------------------------------------------------------------------------------
# sources


def _zoo_squeezenet() -> onnx.ModelProto:
    pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    from onnxprune.models import zoo

    return onnx.load(str(zoo.export("squeezenet1_1", "legacy")))


SOURCE_BUILDERS = {
    "small_cnn": graphs.small_cnn,
    "planted_cnn": graphs.planted_cnn,
    "squeezenet1_1": _zoo_squeezenet,
}


@functools.cache
def _source_bytes(source: str) -> bytes:
    return SOURCE_BUILDERS[source]().SerializeToString()


def _source(source: str) -> onnx.ModelProto:
    return onnx.load_from_string(_source_bytes(source))


# ----------------------------------------------------------------------------------------------
# mutations: (model, rng, root) -> (path of the model to prune, description)


def _save(model: onnx.ModelProto, src: pathlib.Path) -> pathlib.Path:
    p = src / "m.onnx"
    p.write_bytes(model.SerializeToString())
    return p


def _flip(buf: bytearray, positions, rng: np.random.Generator) -> list[tuple[int, int]]:
    done = []
    for pos in positions:
        mask = int(rng.integers(1, 256))
        buf[int(pos)] ^= mask
        done.append((int(pos), mask))
    return done


def mut_truncate(model, rng, root):
    data = model.SerializeToString()
    cut = int(rng.integers(0, len(data)))
    p = root / "src" / "m.onnx"
    p.write_bytes(data[:cut])
    return p, f"truncate at byte {cut} of {len(data)}"


def mut_flip_raw(model, rng, root):
    inits = [t for t in model.graph.initializer if len(t.raw_data)]
    t = inits[int(rng.integers(0, len(inits)))]
    raw = bytearray(t.raw_data)
    k = int(rng.integers(1, 9))
    flips = _flip(raw, rng.integers(0, len(raw), size=k), rng)
    t.raw_data = bytes(raw)
    return _save(model, root / "src"), f"flip raw_data of {t.name!r} at (pos, xor) {flips}"


def mut_flip_struct(model, rng, root):
    data = bytearray(model.SerializeToString())
    spans = []
    for t in model.graph.initializer:
        if len(t.raw_data) > 0:
            start = bytes(data).find(t.raw_data)
            if start >= 0:
                spans.append((start, start + len(t.raw_data)))
    allowed = np.ones(len(data), dtype=bool)
    for a, b in spans:
        allowed[a:b] = False
    candidates = np.flatnonzero(allowed)
    k = int(rng.integers(1, 5))
    flips = _flip(data, rng.choice(candidates, size=k, replace=False), rng)
    p = root / "src" / "m.onnx"
    p.write_bytes(bytes(data))
    return p, f"flip structure bytes at (pos, xor) {flips} of {len(data)}"


def _bent(d: int, rng: np.random.Generator) -> int:
    return int(rng.choice([0, 1, d - 1, d + 1, 2 * d, -1, 3, 2**31]))


def mut_bend_dim(model, rng, root):
    g = model.graph
    shaped = [vi for vi in (*g.input, *g.output, *g.value_info)
              if vi.type.HasField("tensor_type") and len(vi.type.tensor_type.shape.dim)]
    inits = [t for t in g.initializer if len(t.dims)]
    n = len(inits) + len(shaped)
    i = int(rng.integers(0, n))
    if i < len(inits):
        t = inits[i]
        axis = int(rng.integers(0, len(t.dims)))
        old = t.dims[axis]
        t.dims[axis] = _bent(old, rng)
        desc = f"bend initializer {t.name!r} dim {axis}: {old} -> {t.dims[axis]}"
    else:
        vi = shaped[i - len(inits)]
        dims = vi.type.tensor_type.shape.dim
        axis = int(rng.integers(0, len(dims)))
        old = dims[axis].dim_value if dims[axis].HasField("dim_value") else dims[axis].dim_param
        if rng.random() < 0.2:
            dims[axis].dim_param = "bent"
        else:
            dims[axis].dim_value = _bent(old if isinstance(old, int) else 4, rng)
        new = dims[axis].dim_value if dims[axis].HasField("dim_value") else dims[axis].dim_param
        desc = f"bend value_info {vi.name!r} dim {axis}: {old!r} -> {new!r}"
    return _save(model, root / "src"), desc


EXT_KINDS = ("dotdot", "absolute", "missing", "offset", "length")


def mut_ext_data(model, rng, root):
    src = root / "src"
    p = src / "m.onnx"
    onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    data_file = src / "w.bin"
    m = onnx.load(str(p), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    t = ext[int(rng.integers(0, len(ext)))]
    info = {e.key: e.value for e in t.external_data}
    kind = EXT_KINDS[int(rng.integers(0, len(EXT_KINDS)))]
    size = data_file.stat().st_size
    if kind == "dotdot":
        (root / "x").write_bytes(data_file.read_bytes())
        info["location"] = "../x"
    elif kind == "absolute":
        outside = root / "abs.bin"
        outside.write_bytes(data_file.read_bytes())
        info["location"] = str(outside)
    elif kind == "missing":
        info["location"] = "missing.bin"
    elif kind == "offset":
        info["offset"] = str(int(rng.choice([size, size + 7, int(rng.integers(0, size)), 2**40])))
    else:
        length = int(info.get("length", 0))
        info["length"] = str(int(rng.choice([0, max(length - 1, 0), length + 1, size + 1, 2**40])))
    del t.external_data[:]
    for key, value in info.items():
        e = t.external_data.add()
        e.key, e.value = key, value
    p.write_bytes(m.SerializeToString())
    return p, f"external data of {t.name!r}: {kind} -> {info}"


MUTATIONS = {
    "truncate": mut_truncate,
    "flip_raw": mut_flip_raw,
    "flip_struct": mut_flip_struct,
    "bend_dim": mut_bend_dim,
    "ext_data": mut_ext_data,
}


# ----------------------------------------------------------------------------------------------
# one case


class _Hang(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Hang()


def _tree(d: pathlib.Path, skip: pathlib.Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p == skip or skip in p.parents:
            continue
        out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _run_main(argv: list[str]) -> tuple[int | None, str, str, str | None]:
    """``main(argv)`` with stdout/stderr captured; (exit code, stdout, stderr, escaped exception)."""
    import onnxprune.cli

    out, err = io.StringIO(), io.StringIO()
    escaped = None
    rc: int | None = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = onnxprune.cli.main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - any exception escaping main is the finding
            tb = traceback.format_exception(exc)
            escaped = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} " \
                      f"(at {tb[-2].strip().splitlines()[0] if len(tb) > 1 else '?'})"
    return rc, out.getvalue(), err.getvalue(), escaped


def run_case(source: str, mutation: str, seed: int, root: pathlib.Path) -> str | None:
    """Mutate ``source`` with ``mutation`` at ``seed`` under ``root``, prune it; None when the
    contract holds, else what broke it."""
    rng = np.random.default_rng(seed)
    src, out_dir, cwd = root / "src", root / "out", root / "cwd"
    for d in (src, out_dir, cwd):
        d.mkdir(parents=True)
    model_path, desc = MUTATIONS[mutation](_source(source), rng, root)
    out_path = out_dir / "pruned.onnx"
    before = _tree(root, out_dir)
    tag = f"[{source} {mutation} seed={seed}: {desc[:300]}]"

    old_cwd = os.getcwd()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(ALARM_S)
    try:
        os.chdir(cwd)
        rc, stdout, stderr, escaped = _run_main(
            ["prune", str(model_path), "-o", str(out_path), "--ratio", "0.5", "--verify"])
    except _Hang:
        return f"{tag} hang: no result after {ALARM_S} s"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)

    if escaped is not None:
        return f"{tag} exception escaped main: {escaped}"
    if "Traceback" in stdout or "Traceback" in stderr:
        return f"{tag} traceback printed (exit {rc}): {stderr[-500:]!r}"
    after = _tree(root, out_dir)
    if after != before:
        changed = sorted(set(before.items()) ^ set(after.items()))
        return f"{tag} exit {rc}: files outside the output folder changed (input or elsewhere): {changed[:5]}"
    listing = sorted(p.name for p in out_dir.iterdir())
    err_lines = stderr.splitlines()
    if rc == 0:
        out_lines = [ln for ln in stdout.splitlines() if ln.strip()]
        if not out_lines or out_lines[-1].strip() != "PASSED":
            return f"{tag} exit 0 without PASSED: {stdout[-300:]!r}"
        if not out_path.is_file():
            return f"{tag} exit 0 without a file at OUT; out folder {listing}"
        try:
            onnx.checker.check_model(str(out_path), full_check=True)
        except Exception as exc:  # noqa: BLE001
            return f"{tag} exit 0 but OUT fails the checker: {type(exc).__name__}: {str(exc)[:200]}"
        referenced = {"pruned.onnx"}
        for t in onnx.load(str(out_path), load_external_data=False).graph.initializer:
            referenced.update(e.value for e in t.external_data if e.key == "location")
        stray = sorted(set(listing) - referenced)
        if stray:
            return f"{tag} exit 0 left stray files in the output folder: {stray}"
        return None
    if rc == 1:
        failed_line = any(ln.startswith("FAILED") for ln in stdout.splitlines())
        one_error = len(err_lines) == 1 and err_lines[0].startswith(PREFIX)
        if not (failed_line or one_error):
            return f"{tag} exit 1 without FAILED line or one error line: {stdout[-200:]!r} {stderr[-200:]!r}"
    elif rc in (2, 3, 4):
        if len(err_lines) != 1 or not err_lines[0].startswith(PREFIX) or not err_lines[0][len(PREFIX):].strip():
            return f"{tag} exit {rc} with stderr not one error line: {stderr[-400:]!r}"
    else:
        return f"{tag} unexpected exit {rc!r}: {stderr[-300:]!r}"
    if listing:
        return f"{tag} exit {rc} but the output folder is not empty: {listing}"
    return None


def replay(source: str, mutation: str, seed: int) -> str | None:
    with tempfile.TemporaryDirectory() as d:
        return run_case(source, mutation, seed, pathlib.Path(d) / "case")


def _run_seeds(source: str, mutation: str, seeds, tmp_path: pathlib.Path) -> list[str]:
    found = []
    for seed in seeds:
        root = tmp_path / f"s{seed}"
        try:
            bad = run_case(source, mutation, seed, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if bad:
            found.append(bad)
    return found


# ----------------------------------------------------------------------------------------------
# the CI run

SEEDS = {"small_cnn": 120, "planted_cnn": 120, "squeezenet1_1": 16}
CLASSES = [(s, m) for s in SEEDS for m in MUTATIONS]


@pytest.mark.parametrize(("source", "mutation"), CLASSES, ids=[f"{s}-{m}" for s, m in CLASSES])
def test_fuzz_contract(source, mutation, tmp_path):
    found = _run_seeds(source, mutation, range(SEEDS[source]), tmp_path)
    assert not found, f"{len(found)} contract violation(s); replay with run_case(source, mutation, seed, dir):\n" \
                      + "\n".join(found)


def test_fuzz_runs_enough_cases():
    assert sum(SEEDS[s] for s, _ in CLASSES) >= 500


if __name__ == "__main__":  # pragma: no cover
    print(replay(sys.argv[1], sys.argv[2], int(sys.argv[3])))
