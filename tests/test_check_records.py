"""benchmarks/check_records.py, the rerun-and-compare check of issue 14: what it calls a move (no rerun here)."""
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_records", REPO / "benchmarks" / "check_records.py")
cr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cr)


def test_a_float_moved_by_one_bit_is_a_move_and_wall_times_are_not():
    old = {"metrics": {"students": [{"acc": 0.1 + 0.2, "wall_time_s": 3.0, "train_images_per_s": 10.0}],
                       "nan": float("nan")}, "claims": {"A1": {"values": [97.0]}}}
    same = {"metrics": {"students": [{"acc": 0.1 + 0.2, "wall_time_s": 9.0, "train_images_per_s": 1.0}],
                        "nan": float("nan")}, "claims": {"A1": {"values": [97.0]}}}
    assert cr.differences(old, same) == []
    moved = {"metrics": {"students": [{"acc": 0.30000000000000004 + 1e-16, "wall_time_s": 3.0,
                                       "train_images_per_s": 10.0}], "nan": float("nan")},
             "claims": {"A1": {"values": [97.0, 1.0]}, "A5": {}}}
    assert cr.differences(old, moved) == ["/claims/A1/values: 1 vs 2 entries", "/claims/A5: only in new",
                                          "/metrics/students[0]/acc: 0.30000000000000004 -> 0.30000000000000016"]


def test_only_unit_suffixes_are_volatile_not_every_name_containing_time():
    assert all(cr.volatile(k) for k in ("wall_time_s", "train_images_per_s", "latency_ms", "cache_hit",
                                        "teacher_cache_hit"))
    assert not any(cr.volatile(k) for k in ("time_to_best_epoch", "timesteps", "best_epoch", "seconds_model"))
    assert cr.differences({"timesteps": 3}, {"timesteps": 4}) == ["/timesteps: 3 -> 4"]
