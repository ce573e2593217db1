"""Outputs that cannot escape or half-exist: hostile class and file names stay inside the output folder; an
interrupt, a full disk or SIGTERM while writing leaves the complete earlier result or none; the model comes back."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import medlens
from medlens.cli.group import main
from medlens.core.result import ExplanationResult
from medlens.errors import OutputError
from medlens.io import formats as formats_module
from medlens.io.output import write_explanation

from helpers import TinyCNN2d, write_noise_png

HOSTILE = ["../../evil", "..", "a/b\\c", "/etc/passwd", "", "C:\\x", ".hidden", "x" * 400]


def _result(n_classes: int, labels) -> ExplanationResult:
    gen = torch.Generator().manual_seed(0)
    maps = {"gradcam": torch.rand(1, n_classes, 8, 8, generator=gen)}
    targets = torch.arange(n_classes)[None]
    return ExplanationResult(maps, torch.randn(1, n_classes, generator=gen), targets, {"methods": {}}, labels=list(labels))


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_class_names_stay_inside_the_output_folder(tmp_path):
    out = tmp_path / "box" / "out"
    before = _tree(tmp_path)
    written = write_explanation(_result(len(HOSTILE), HOSTILE), out, display=np.zeros((8, 8), np.float32))
    assert all(p.resolve().parent == out.resolve() for p in written)
    assert {p for p in _tree(tmp_path) - before if not p.startswith("box")} == set()  # nothing beside the folder
    names = [p.name for p in written]
    assert len(names) == len(set(n.casefold() for n in names))  # no two targets share a file
    assert all(not n.startswith(".") and len(n) < 120 for n in names)


def test_an_input_named_to_climb_out_writes_inside_out(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_noise_png(data / "...png", (32, 32), high=255, format="PNG")
    out = tmp_path / "inner" / "out"
    code = main(["explain", str(data / "...png"), "--model", "phantom-lesion", "--methods", "gradcam", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    provenance = [p for p in tmp_path.rglob("provenance.json")]
    assert len(provenance) == 1 and out.resolve() in provenance[0].resolve().parents
    assert provenance[0].parent.parent.resolve() == out.resolve()


def _write_twice(tmp_path: Path, fail_on) -> tuple[Path, dict[str, bytes]]:
    """Write a result, then write another over it with `fail_on` breaking the second write."""
    out = tmp_path / "out"
    write_explanation(_result(2, ["normal", "lesion"]), out, display=np.zeros((8, 8), np.float32))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    fail_on()
    return out, first


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_while_staging_keeps_the_earlier_result(tmp_path, monkeypatch, interrupt):
    def explode(job, folder):
        (folder / "half.png").write_bytes(b"\x89PNG half")
        raise interrupt()

    out, first = _write_twice(tmp_path, lambda: monkeypatch.setitem(formats_module.FORMATS, "npz", explode))
    with pytest.raises(interrupt):
        write_explanation(_result(2, ["normal", "lesion"]), out, display=np.ones((8, 8), np.float32))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # byte for byte, and no staging folder left


def test_an_interrupt_while_moving_in_puts_the_earlier_files_back(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # some new files are in, some earlier ones set aside
            raise KeyboardInterrupt()
        return real_replace(src, dst)

    out, first = _write_twice(tmp_path, lambda: None)
    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_explanation(_result(2, ["normal", "lesion"]), out, display=np.ones((8, 8), np.float32))
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls) >= 4
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (needs root, as in CI); skipped with the reason where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); the full-disk case "
                    f"needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_keeps_the_earlier_result_and_says_so(tiny_disk):
    out = tiny_disk / "out"
    small = _result(2, ["normal", "lesion"])
    write_explanation(small, out, display=np.zeros((8, 8), np.float32), formats=["npz"])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    gen = torch.Generator().manual_seed(1)
    big = ExplanationResult({"gradcam": torch.rand(1, 2, 256, 256, generator=gen)}, torch.randn(1, 2), torch.tensor([[0, 1]]),
                            {"methods": {}}, labels=["normal", "lesion"])  # 512 KiB of raw maps: more than the disk
    with pytest.raises(OutputError) as caught:
        write_explanation(big, out, display=np.zeros((256, 256), np.float32), formats=["npz"])
    assert "No space left" in str(caught.value) or "space" in str(caught.value).lower()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_sigterm_while_writing_leaves_no_partial_result(tmp_path):
    """`medlens explain` killed with SIGTERM while it writes: exit 143, and the folder holds nothing half-made."""
    script = tmp_path / "slow_writer.py"
    ready = tmp_path / "ready"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from medlens.io import formats
        real = formats.FORMATS["npz"]
        def slow(job, folder):
            paths = real(job, folder)
            Path({str(ready)!r}).write_text("writing")
            time.sleep(60)
            return paths
        formats.FORMATS["npz"] = slow
        from medlens.cli.group import main
        sys.exit(main(sys.argv[1:]))
    """))
    image = tmp_path / "scan.png"
    write_noise_png(image, (32, 32), high=255)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), "explain", str(image), "--model", "phantom-lesion",
                             "--methods", "gradcam", "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "the writer never started"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert code == 143 and "SIGTERM" in err and "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*")), sorted(_tree(out))


def test_an_interrupt_inside_explain_leaves_the_model_as_found():
    torch.manual_seed(0)
    model = TinyCNN2d(num_classes=3).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    calls = {"n": 0}

    def interrupt_on_second_forward(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt()

    handle = model.register_forward_pre_hook(interrupt_on_second_forward)
    hooks_before = len(model._forward_pre_hooks) + sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    x = torch.randn(1, 1, 24, 24)
    with pytest.raises(KeyboardInterrupt):
        medlens.explain(model, x, methods=["gradcam", "occlusion"], targets=[0])
    handle.remove()
    hooks_after = len(model._forward_pre_hooks) + sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks_after == hooks_before - 1 and calls["n"] >= 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training


def test_deferred_fsync_skips_the_per_file_sync_and_the_manifest_syncs_outputs_before_its_lines(tmp_path, monkeypatch):
    """Batch writes skip the per-file fsync (still atomic); the manifest runs os.sync() before each fsync of its own,
    so a line on disk never names an output that is not."""
    from medlens.batch.manifest import ManifestWriter
    from medlens.io.files import atomic_write, deferred_fsync

    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(os, "sync", lambda: calls.append("sync"))
    atomic_write(tmp_path / "a.txt", "a")
    assert calls == ["fsync"]
    calls.clear()
    with deferred_fsync():
        atomic_write(tmp_path / "b.txt", "b")
        write_explanation(_result(2, ["normal", "lesion"]), tmp_path / "out", display=np.zeros((8, 8), np.float32))
    assert calls == [] and (tmp_path / "b.txt").read_text() == "b" and (tmp_path / "out" / "provenance.json").is_file()
    atomic_write(tmp_path / "c.txt", "c")  # the block is over: back to one fsync per file
    assert calls == ["fsync"]
    calls.clear()
    with ManifestWriter(tmp_path / "manifest.jsonl") as manifest:
        manifest.append({"id": "x", "status": "done"})
    assert calls[-2:] == ["sync", "fsync"]


def test_files_in_the_staging_folder_are_written_in_place_and_fsynced_others_by_rename(tmp_path, monkeypatch):
    """Inside `write_explanation`'s staging folder the set is atomic as a whole, so its files skip their own temporary
    name and rename; they are still fsynced (outside the batch) and 0644; a file elsewhere keeps the atomic rename."""
    from medlens.io import files

    renames, syncs = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((Path(a).name, Path(b).name)) or real_replace(a, b))
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    old = os.umask(0o077)
    try:
        written = write_explanation(_result(2, ["normal", "lesion"]), tmp_path / "out",
                                    display=np.zeros((8, 8), np.float32), formats=["png", "npz"])
        elsewhere = files.atomic_write(tmp_path / "other.txt", "x")
    finally:
        os.umask(old)
    names = sorted(p.name for p in written)
    assert [b for a, b in renames if b in names] == [p.name for p in written]  # each moved in once, by name
    assert not any(a.endswith(".tmp") for a, b in renames if b in names)  # no temporary file of its own
    assert any(a.startswith(".other.txt.") for a, b in renames if b == "other.txt")
    assert len(syncs) == len(written) + 1
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in written + [elsewhere])
    assert _tree(tmp_path / "out") == set(names)
