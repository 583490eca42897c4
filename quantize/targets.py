"""What int8 must keep against the float model: one definition read by the quantization report, every
int8 verification at export and the benchmark's recommendations."""

TARGETS = {"min_top1_agreement": 0.995, "max_accuracy_drop_points": 0.3, "max_class_recall_drop_points": 1.0,
           "max_size_ratio": 0.27, "min_speedup": 3.0}
MIN_TOP1_AGREEMENT = TARGETS["min_top1_agreement"]
