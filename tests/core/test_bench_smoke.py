"""Smoke subset of the benchmark suite (tiny sizes, a few seconds): every case runs and agrees."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import cases, interleaved, report

pytestmark = pytest.mark.bench_smoke
B, C, D = 8, 96, 16


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
def test_every_case_runs_and_implementations_agree(margin_type):
    losses = {}
    for method in cases.METHODS:
        if method == "pml":
            pytest.importorskip("pytorch_metric_learning")
        if method == "fastreid":
            pytest.importorskip("fastreid.layers.any_softmax")
        step = cases.make_case(method, B, C, D, margin_type, chunk_size=32)
        losses[method] = step()
        assert torch.isfinite(losses[method]), method
    # same data, same seed: every LEAP implementation gives the same loss, and so does PML
    # without cloud (fastreid's ArcSoftmax has no clamp: equal here since no angle passes pi)
    for m in ("leap_reference", "leap_chunked", "pml", "fastreid"):
        torch.testing.assert_close(losses[m], losses["leap"], atol=1e-5, rtol=1e-5)
    for m in ("leap_cloud_reference", "leap_cloud_chunked"):
        torch.testing.assert_close(losses[m], losses["leap_cloud"], atol=1e-5, rtol=1e-5)
    assert abs(losses["leap_cloud"] - losses["leap"]) > 1e-4  # the cloud is on


def test_interleaved_report_and_png(tmp_path):
    pytest.importorskip("matplotlib")  # the [test] extra's: the PNG
    run = {
        "batch": B,
        "classes": C,
        "dim": D,
        "reps": 2,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": "test",
        "cpus": 1,
        "loadavg_before": (0.0, 0, 0),
        "loadavg_after": (0.0, 0, 0),
        "results": {},
    }
    for mt in ("cosface", "arcface"):
        run["results"][mt] = interleaved.measure(
            ["floor", "leap", "leap_cloud"], B, C, D, mt, reps=2
        )
        assert run["results"][mt]["floor"]["ratio"] == 1.0
        assert run["results"][mt]["leap"]["median_ms"] > 0
    inter = tmp_path / "inter.json"
    inter.write_text(json.dumps(run))
    bench = {
        "datetime": "now",
        "machine_info": {"cpu": {"brand_raw": "x"}},
        "benchmarks": [
            {"group": "g", "name": n, "extra_info": {"method": n}, "stats": {"median": t}}
            for n, t in (("floor", 0.2), ("leap", 0.1))
        ],
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nintro\n\n{report.START}\nold\n{report.END}\n\noutro\n")
    report.main(
        [
            "--bench",
            str(tmp_path / "bench.json"),
            "--interleaved",
            str(inter),
            "--readme",
            str(readme),
            "--png",
            str(tmp_path / "r.png"),
        ]
    )
    text = readme.read_text()
    assert "intro" in text and "outro" in text and "old" not in text
    assert "| g | LEAPMarginHead, cloud off (fused) | 100.0 | 0.50 |" in text
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_peak_memory_child_process(tmp_path):
    out = tmp_path / "mem.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.peak_memory",
            "--configs",
            "chunked_cloud",
            "--classes",
            "4096",
            "--batch",
            "16",
            "--dim",
            "32",
            "--chunk-size",
            "1024",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (row,) = json.loads(out.read_text())
    assert row["status"] == "ok" and row["peak_rss"] >= row["rss_before_step"] > 0
    assert row["w_bytes"] == 4096 * 32 * 4


def test_the_timing_drivers_pin_the_allocator_and_record_it(tmp_path):
    """s53 perf finding 6: the floor's time (and so every ratio) depended on glibc's dynamic
    mmap threshold, i.e. on which other methods had run in the process (LEAP cloud 0.53x or
    1.14x the floor). The drivers pin the thresholds at start-up and record the setting; in a
    child process, so that this test process keeps its allocator."""
    import platform

    glibc = platform.libc_ver()[0] == "glibc"
    tiny = ["--batch", "8", "--classes", "96", "--dim", "16", "--reps", "2"]
    drivers = {
        "interleaved": ["--margin-types", "cosface", "--methods", "floor,leap"],
        "suite": ["--methods", "floor", "--settings", "reid", "--data", "random", "--threads", "1"],
    }
    for name, args in drivers.items():
        for env_value in (None, "default") if name == "interleaved" else (None,):
            out = tmp_path / f"{name}_{env_value}.json"
            env = {k: v for k, v in os.environ.items() if k != "FC_BENCH_MALLOC"}
            if env_value:
                env["FC_BENCH_MALLOC"] = env_value
            run = subprocess.run(
                [sys.executable, "-m", f"benchmarks.{name}", *tiny, *args, "--out", str(out)],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
                env=env,
            )
            data = json.loads(out.read_text())
            setting = data["allocator"]
            assert "allocator:" in run.stdout, name
            if name == "interleaved":  # the generated table says so
                text = "\n".join(report.interleaved_table([data]))
                pinned = "malloc mmap/trim thresholds pinned (1 GiB)" in text
                assert pinned is bool(setting["pinned"]), text
            if env_value or not glibc:
                assert setting["pinned"] is False and setting["note"], (name, setting)
            else:
                assert setting["pinned"] is True, (name, setting)
                assert setting["mmap_threshold"] == cases.PINNED_MALLOC_THRESHOLD
                assert setting["trim_threshold"] == cases.PINNED_MALLOC_THRESHOLD
    if not glibc:
        return
    # the pin takes effect: a 100 MB block comes from the heap, not from mmap (mallinfo2)
    probe = (
        "import ctypes, ctypes.util\n"
        "from benchmarks.cases import pin_allocator\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "class MI(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in 'a o s hblks hblkhd u f uo fo k'.split()]\n"
        "libc.mallinfo2.restype = MI\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def mapped():\n"
        "    p = libc.malloc(100 << 20)\n"
        "    n = libc.mallinfo2().hblkhd\n"
        "    libc.free(p)\n"
        "    return n >= 100 << 20\n"
        "before = mapped()\n"
        "pin_allocator()\n"
        "print(before, mapped())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    run = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=env
    )
    assert run.stdout.split() == ["True", "False"], run.stdout


def test_pin_allocator_without_mallopt_records_it(monkeypatch):
    """A C library without ``mallopt`` (or none to load): the drivers start and record that
    nothing was pinned (an AttributeError escaped, s53 review)."""
    import ctypes
    import platform

    from benchmarks import cases

    class NoMallopt:
        def __getattr__(self, name):
            raise AttributeError(f"function {name!r} not found")

    monkeypatch.setattr(cases, "_PINNED", None)
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("glibc", "2.36"))
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: NoMallopt())
    monkeypatch.delenv("FC_BENCH_MALLOC", raising=False)
    setting = cases.pin_allocator()
    assert setting["pinned"] is False and "mallopt not found" in str(setting["note"])
    monkeypatch.setattr(cases, "_PINNED", None)


def test_feature_transfer_benchmark_case():
    from benchmarks.test_bench_transfer import make_transfer

    ft, stream, counts = make_transfer(samples=3000, dim=16, classes=50, batch=256)
    ft.update_stats(stream)
    assert ft.ready and ft.regular.any() and (~ft.regular).any()
    y_r = torch.nonzero(ft.regular).flatten()[:4]
    y_t = torch.nonzero(~ft.regular).flatten()[:4]
    assert ft.transfer(torch.randn(4, 16), y_r, y_t).shape == (4, 16)


def test_suite_grid_and_its_tables(tmp_path):
    """The issue-14 grid (benchmarks/suite.py) at toy size: every method of every setting runs,
    ratios are per repetition and setting, and the report renders them into both READMEs."""
    from benchmarks import suite

    pytest.importorskip("pytorch_metric_learning")
    pytest.importorskip("fastreid.layers.any_softmax")
    res = suite.run(
        list(suite.METHODS),
        ["reid", "face"],
        ["random", "trained"],
        [1],
        8,
        96,
        16,
        reps=1,
        warmup=0,
    )
    rows = res["1"]["face"]["trained"]
    assert set(rows) == set(suite.METHODS)
    assert rows["floor"]["x_floor"] == 1.0 and rows["gemm3"]["x_gemm3"] == 1.0
    assert "x_bare" in rows["pml_leap"] and "x_bare" in rows["fastreid_leap_cloud"]
    assert rows["leap_cloud_margin"]["x_floor"] > 0
    run = {
        "batch": 8,
        "classes": 96,
        "dim": 16,
        "reps": 1,
        "torch": torch.__version__,
        "cpus": 1,
        "settings": {k: suite.SETTINGS[k] for k in ("reid", "face")},
        "loadavg_before": (0.0, 0, 0),
        "loadavg_after": (0.0, 0, 0),
        "results": res,
    }
    (tmp_path / "suite.json").write_text(json.dumps(run))
    readme = tmp_path / "README.md"
    readme.write_text(f"# R\n\n{report.SPEED_START}\nold\n{report.SPEED_END}\n")
    report.main(["--suite", str(tmp_path / "suite.json"), "--main-readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "| 1 | face (s=64, m=0.35) trained |" in text
    assert "Time / three-GEMM limit" in text and "LEAP margin cloud" in text
    assert "fwd+bwd float32, CPU (1 cores" in text
    # a GPU run's caption names the device and the autocast; its sub-10 ms times keep two digits
    gpu = dict(run, device="NVIDIA H200", autocast="bf16", inner=10)
    text = "\n".join(report.suite_tables(gpu))
    assert "fwd+bwd bf16 autocast, NVIDIA H200 (a time: 10 back-to-back steps" in text
    assert "CPU (" not in text
    floor_ms = res["1"]["face"]["trained"]["floor"]["median_ms"]
    assert f"| 1 | face (s=64, m=0.35) trained | {floor_ms:.2f} |" in text
    assert "compiled" not in text
    # compiled cases (``--methods ..._compiled``) get their own columns, in the floor's units
    rows = gpu["results"]["1"]["face"]["trained"]
    rows["leap_compiled"] = dict(rows["leap"], x_floor=0.74)
    text = "\n".join(report.suite_tables(gpu))
    assert "| LEAP off compiled |" in text and "| 0.74 |" in text


def test_compiled_cases_match_their_eager_step():
    """``<method>_compiled`` runs the same step under ``torch.compile(fullgraph=True)``; only the
    methods in ``cases.COMPILABLE`` have one."""
    torch._dynamo.reset()
    compiled = cases.make_case("floor_compiled", 8, 40, 16, scale=64.0, margin=0.35)
    eager = cases.make_case("floor", 8, 40, 16, scale=64.0, margin=0.35)
    for _ in range(3):
        torch.testing.assert_close(compiled(), eager())
    with pytest.raises(ValueError, match="_compiled"):
        cases.make_case("pml_compiled", 8, 40, 16)
