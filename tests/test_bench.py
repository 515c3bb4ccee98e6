"""``python -m bench --quick``: a well-formed results.json for every path, and a warm cache that never runs the teacher.

No assertion here is about speed: the numbers only have to exist and be positive.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.bench import DEFAULT_PATHS, RunSizes, build_parser, merge_rounds, run_bench
from repro.core.errors import ReproError

SETTING_KEYS = {"loader", "teacher", "flush_denormal", "channels_last", "precision", "cache_dtype", "num_workers",
                "threads", "device"}


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def _bench(tmp_path: Path, *argv: str) -> dict:
    output = tmp_path / "bench" / "results.json"
    # One thread: two OpenMP threads crawl when the test machine is oversubscribed (and speed is not tested).
    args = _args("--quick", "--data-root", str(tmp_path / "data"), "--output", str(output), "--steps", "2",
                 "--warmup", "1", "--batch-size", "8", "--threads", "1", *argv)
    assert run_bench(args) == 0
    return json.loads(output.read_text())


def test_quick_bench_reports_every_path_and_the_warm_cache_skips_the_teacher(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--no-isolate", "--workers", "1")
    assert {"cpu", "cpu_count", "device", "versions"} <= set(report["machine"])
    assert report["setup"]["data"]["kind"] == "synthetic"
    assert report["setup"]["teacher_cache_size"]["cifar100_bytes"] == 50000 * 162 * (100 * 2 + 1)
    results = {r["path"]: r for r in report["results"]}
    assert set(results) == set(DEFAULT_PATHS) and len(report["results"]) == len(DEFAULT_PATHS)
    for row in report["results"]:
        assert row["pair"] == "resnet8->resnet8"
        assert row["img_per_s"] > 0 and row["img_per_s_mean"] > 0 and row["rss_peak_mb"] > 0
        assert SETTING_KEYS <= set(row["settings"])
    assert results["reference"]["settings"]["flush_denormal"] is False
    assert results["reference_flush"]["settings"]["flush_denormal"] is True
    assert results["reference"]["settings"]["num_workers"] == 1
    assert all(row["settings"]["threads"] == 1 for row in report["results"])

    # The live paths run the teacher once per timed step; the cold cache runs it on exactly its misses.
    assert results["reference"]["teacher_calls_timed"] == 2
    assert results["fast_live"]["teacher_images_timed"] == 2 * 8
    cold = results["fast_cold"]
    assert cold["cache_misses_timed"] > 0 and cold["teacher_images_timed"] == cold["cache_misses_timed"]
    warm = results["fast_warm"]
    assert warm["teacher_calls_timed"] == 0 and warm["teacher_images_timed"] == 0
    assert warm["cache_hits_timed"] == 2 * 8 and warm["cache_misses_timed"] == 0
    assert warm["cache_filled_fraction_before_timing"] > 0

    ratios = report["ratios"]["resnet8->resnet8"]
    assert ratios["fast_warm/reference"] == pytest.approx(
        results["fast_warm"]["img_per_s"] / results["reference"]["img_per_s"], rel=0.02)


def test_isolated_job_runs_in_a_fresh_process(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--paths", "fast_warm", "--steps", "1", "--warmup", "0")
    (row,) = report["results"]
    assert row["path"] == "fast_warm" and row["img_per_s"] > 0 and row["teacher_calls_timed"] == 0
    assert "fresh process" in report["setup"]["timing"]


@pytest.mark.parametrize("argv, message", [(("--pairs", "resnet56"), "TEACHER:STUDENT"),
                                           (("--pairs", "resnet56:nosuchnet"), "nosuchnet"),
                                           (("--steps", "0"), "--steps"), (("--rounds", "0"), "--rounds")])
def test_bad_arguments_raise_repro_error(tmp_path: Path, argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ReproError, match=message):
        run_bench(_args("--output", str(tmp_path / "r.json"), *argv))


def test_rounds_pool_their_timed_steps() -> None:
    def row(seconds: list[float], hits: int, rss: float) -> dict:
        return {"pair": "a->b", "path": "fast_warm", "step_seconds": seconds, "step_images": [64] * len(seconds),
                "teacher_calls_timed": 0, "cache_hits_timed": hits, "rss_peak_mb": rss, "load_avg_1min": [1.0, 2.0]}

    merged = merge_rounds([row([1.0, 1.0], 128, 900.0), row([2.0, 4.0], 128, 950.0)], RunSizes(2, 1, 64))
    assert merged["img_per_s"] == pytest.approx((64 / 1.0 + 64 / 2.0) / 2)  # median of 64, 64, 32, 16
    assert merged["img_per_s_mean"] == pytest.approx(4 * 64 / 8.0)
    assert merged["img_per_s_by_round"] == [64.0, 24.0]
    assert merged["cache_hits_timed"] == 256 and merged["rss_peak_mb"] == 950.0 and merged["rounds"] == 2
    assert "step_seconds" not in merged and merged["load_avg_1min"] == [1.0, 2.0, 1.0, 2.0]
