"""The MindEye2 paper's image-reconstruction evaluation (Table 1): metrics, feature networks, reports."""
from mindeye.evaluation.features import (
    FEATURE_EXTRACTORS,
    FeatureExtractor,
    MetricUnavailable,
    build_feature_extractor,
)
from mindeye.evaluation.image_metrics import correlation_distance, pixcorr, ssim, two_way_identification
from mindeye.evaluation.report import METRIC_COLUMNS, evaluate_reconstructions, save_image_grid, write_table

__all__ = [
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "METRIC_COLUMNS",
    "MetricUnavailable",
    "build_feature_extractor",
    "correlation_distance",
    "evaluate_reconstructions",
    "pixcorr",
    "save_image_grid",
    "ssim",
    "two_way_identification",
    "write_table",
]
