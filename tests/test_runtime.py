"""The appendix's machinery (gpt2lib.runtime) and the package's structure: layers,
docstrings, scripts."""

import ast
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2lib
from gpt2lib.runtime import (
    DirectoryLocked,
    atomic_write,
    autocast_for,
    command_name,
    cpu_info,
    git_state,
    lock_directory,
    one_line,
    provenance,
    resolve_device,
    run_command,
    UserError,
)

LIB = Path(gpt2lib.__file__).parent


def test_resolve_device_accepts_what_is_there_and_names_what_is_not():
    assert resolve_device("cpu") == "cpu" and resolve_device(None) in (
        "cpu",
        "cuda",
        "mps",
    )
    with pytest.raises(ValueError, match="'tpu' is not a device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: no CUDA GPU is visible"):
            resolve_device("cuda:1")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="mps is not available"):
            resolve_device("mps")


def test_autocast_is_bf16_on_cuda_only_unless_asked():
    with autocast_for("cpu")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast_for(
        "cpu", torch.bfloat16
    )():  # how the tests run the GPU's bf16 path on a CPU
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_atomic_write_is_all_or_nothing(tmp_path):
    path = atomic_write(tmp_path / "f.txt", "old\n")
    assert path.read_text() == "old\n" and oct(path.stat().st_mode & 0o777) != oct(
        0o600
    )

    def half_then_full_disk(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_full_disk)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [
        "f.txt"
    ]
    atomic_write(path, b"bytes")
    assert path.read_bytes() == b"bytes"


def test_lock_refuses_a_second_holder_names_the_first_and_is_released(tmp_path):
    with lock_directory(tmp_path / "run", "training run"):
        script = f"from gpt2lib.runtime import lock_directory\nwith lock_directory({str(tmp_path / 'run')!r}): pass"
        other = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True
        )
        assert (
            other.returncode == 1
            and "DirectoryLocked" in other.stderr
            and "is in use by another training run (pid" in other.stderr
        )
        with pytest.raises(DirectoryLocked, match="in use by another training run"):
            with lock_directory(tmp_path / "run", "training run"):
                pass
    with lock_directory(tmp_path / "run"):  # free again
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom gpt2lib.runtime import lock_directory\n"
            f"with lock_directory({str(tmp_path)!r}):\n    print('held', flush=True)\n"
            "    time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DirectoryLocked):
        with lock_directory(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with lock_directory(tmp_path):  # kill -9 left no stale lock
        pass


def test_run_command_exit_statuses(capsys):
    @run_command
    def fails(argv=None):
        raise FileNotFoundError("no such thing\nsecond line")

    @run_command
    def interrupted(argv=None):
        raise KeyboardInterrupt

    @run_command
    def returns(argv=None):
        return 3

    with pytest.raises(SystemExit) as exit:
        fails()
    assert (
        exit.value.code == "error: no such thing second line"
    )  # printed on one line, status 1
    for command, status in ((interrupted, 130), (returns, 3)):
        with pytest.raises(SystemExit) as exit:
            command()
        assert exit.value.code == status
    assert one_line(ValueError("")) == "ValueError"


def test_a_bug_shows_its_traceback_and_a_user_error_does_not(capsys):
    "Only what an input check raises is the user's; a RuntimeError is not."

    @run_command
    def bad_value(argv=None):
        raise UserError("--max-lr must be positive, got -1")

    @run_command
    def shape_bug(argv=None):
        torch.ones(2, 3) @ torch.ones(2, 3)

    @run_command
    def cpu_out_of_memory(argv=None):
        # what PyTorch's CPU allocator raises (no "out of memory" in it)
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
            "allocate memory: you tried to allocate 1099511627776 bytes."
        )

    with pytest.raises(SystemExit) as exit:
        bad_value()
    assert exit.value.code == "error: --max-lr must be positive, got -1"
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        shape_bug()
    assert exit.value.code.startswith("error: RuntimeError: mat1 and mat2 shapes")
    assert "a bug in gpt2lib" in exit.value.code
    shown = capsys.readouterr().err
    assert "Traceback" in shown and "mat1 and mat2 shapes" in shown
    with pytest.raises(SystemExit) as exit:
        cpu_out_of_memory()
    assert exit.value.code.startswith("error: out of memory: ask for less")
    assert "Traceback" not in capsys.readouterr().err


def test_command_name_follows_how_the_command_was_called(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/gpt2-export-hf"])
    assert command_name("export_hf") == "gpt2-export-hf"
    monkeypatch.setattr(sys, "argv", ["/work/gpt2lib/export_hf.py"])
    assert command_name("export_hf") == "python -m gpt2lib.export_hf"


def test_provenance_records_the_commit_and_whether_the_tree_was_dirty():
    state = git_state()
    inside_checkout = (LIB.parent / ".git").exists()
    assert (state["commit"] is not None) == inside_checkout
    if inside_checkout:
        assert len(state["commit"]) == 40 and isinstance(state["dirty"], bool)
    assert {"device", "torch", "cuda", "commit", "dirty", "date"} <= provenance(
        "cpu"
    ).keys()


def test_provenance_records_the_cpu_model_its_vector_flags_and_torchs_threads(
    tmp_path,
):
    "A CPU result repeats bit for bit only on the same CPU model: record which."
    fake = tmp_path / "cpuinfo"
    fake.write_text(
        "processor\t: 0\nmodel name\t: Example CPU 9000 @ 3.0GHz\n"
        "flags\t\t: fpu sse2 fma avx2 avx512f avx512_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Example CPU 9000 @ 3.0GHz\n"
        "flags\t\t: fpu\n"
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        info = cpu_info(fake)
        assert info["cpu"] == "Example CPU 9000 @ 3.0GHz"
        assert info["cpu_flags"] == [
            "fma",
            "avx2",
            "avx512f",
            "avx512_bf16",
            "amx_tile",
        ]
        assert info["threads"] == 1
        assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        # no /proc/cpuinfo (macOS, Windows): still a name, never an error
        missing = cpu_info(tmp_path / "missing")
        assert missing["cpu"] and missing["threads"] == 1
        record = provenance("cpu")
        assert {"cpu", "cpu_flags", "cpu_capability", "threads"} <= record.keys()
        assert record["threads"] == 1 and record["device"].endswith(", 1 threads)")
        assert record["cpu"] in record["device"]
    finally:
        torch.set_num_threads(threads)
    real = Path("/proc/cpuinfo")
    if real.exists() and "model name" in real.read_text():
        model = next(
            line.split(":", 1)[1].strip()
            for line in real.read_text().splitlines()
            if line.startswith("model name")
        )
        assert provenance("cpu")["cpu"] == model


# The package's layers (see gpt2lib/__init__.py): a module imports only from lower
# layers.
LAYERS = {
    "runtime": 0,
    "book": 1,
    "tokenizer": 1,
    "hub": 1,
    "model": 1,
    "optim": 1,
    "dist": 1,
    "rundir": 1,
    "hf": 2,
    "data": 2,
    "modern": 2,
    "parallel": 2,
    "checkpoint": 3,
    "config": 3,
    "bench": 3,
    "fineweb": 3,
    "sample": 4,
    "evaluate": 4,
    "export_hf": 4,
    "loggers": 4,
    "memory": 4,
    "run": 4,
    "cli": 4,
    "evaluations": 5,
    "train": 6,
    "preflight": 6,
    "ladder": 7,
}
UPWARD_ALLOWED = {
    ("model", "hf")
}  # GPT.from_pretrained hands over to gpt2lib.hf, inside the method


def gpt2lib_imports(path: Path) -> set[str]:
    "The gpt2lib modules that `path` imports, anywhere in the file."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("gpt2lib."):
                found.add(node.module.split(".")[1])
    return found


def test_every_module_has_a_layer_and_imports_only_point_down():
    modules = {p.stem for p in LIB.glob("*.py")} - {"__init__"}
    assert modules == LAYERS.keys()
    for name in modules:
        for imported in gpt2lib_imports(LIB / f"{name}.py"):
            assert (
                LAYERS[imported] < LAYERS[name] or (name, imported) in UPWARD_ALLOWED
            ), f"{name} imports {imported}"


def test_every_module_says_what_it_is():
    for path in LIB.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 40, f"{path.name} has no docstring"
        assert not doc.lower().startswith(("chapter", "this chapter")), path.name


def test_one_home_for_shared_helpers():
    """The helpers every module needs are defined once (in runtime), and EOT_TOKEN once
    (in tokenizer)."""
    definitions = {}
    for path in LIB.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = (
                [node.name]
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                else [
                    t.id
                    for t in getattr(node, "targets", [])
                    if isinstance(t, ast.Name)
                ]
            )
            for name in names:
                definitions.setdefault(name, []).append(path.stem)
    for name in (
        "default_device",
        "resolve_device",
        "autocast_for",
        "atomic_write",
        "provenance",
        "git_state",
        "read_log",
        "EOT_TOKEN",
        "split_shards",
        "load_model",
    ):
        assert len(definitions.get(name, [])) == 1, (name, definitions.get(name))
    source = "\n".join(p.read_text() for p in LIB.glob("*.py") if p.stem != "runtime")
    assert "os.replace(" not in source.replace(
        "os.replace(tmp / name, out / name)", ""
    )  # export's per-file --force
    assert (
        "torch.cuda.is_available() else" not in source
    )  # the default device is runtime's


SCRIPTS = [
    "gpt2-train",
    "gpt2-preflight",
    "gpt2-sample",
    "gpt2-evaluate",
    "gpt2-export-hf",
    "gpt2-fineweb",
    "gpt2-bench",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_scripts_answer_help_under_their_own_name(script):
    path = Path(sys.executable).parent / script  # pip install -e . puts it there
    assert path.exists(), f"{script} is not installed: pip install -e ."
    result = subprocess.run(
        [str(path), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script} "), (
        result.stderr
    )


def test_a_file_system_without_locks_is_named_not_mistaken_for_another_run(
    tmp_path, monkeypatch
):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(
        OSError, match="No locks available.*does not support flock"
    ) as err:
        with lock_directory(tmp_path):
            pass
    assert not isinstance(err.value, DirectoryLocked)


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_error_line_leaves_in_one_write(tmp_path):
    "Unbuffered (PYTHONUNBUFFERED=1, as torchrun users often set): still one write."
    script = (
        "from gpt2lib.runtime import UserError, run_command\n"
        "@run_command\n"
        "def main(argv=None):\n"
        "    raise UserError('bad setting')\n"
        "main()\n"
    )
    done = subprocess.run(
        ["strace", "-e", "trace=write", "-o", str(tmp_path / "trace"), sys.executable]
        + ["-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if "ptrace" in done.stderr:  # a sandbox that forbids tracing
        pytest.skip(done.stderr.splitlines()[0])
    assert done.returncode == 1 and done.stderr == "error: bad setting\n"
    writes = [
        w for w in (tmp_path / "trace").read_text().splitlines() if "write(2" in w
    ]
    assert len(writes) == 1 and "error: bad setting\\n" in writes[0]
