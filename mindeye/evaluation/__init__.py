"""The MindEye2 paper's image-reconstruction evaluation (Table 1): metrics, feature networks, reports."""
from mindeye.evaluation.features import (
    FEATURE_EXTRACTORS,
    WORLD_FEATURE_EXTRACTORS,
    ClipTokenFeatures,
    FeatureExtractor,
    MetricUnavailable,
    build_feature_extractor,
    random_alexnet_features,
    world_feature_extractors,
)
from mindeye.evaluation.image_metrics import (
    correlation_distance,
    paired_difference,
    pixcorr,
    ssim,
    two_way_identification,
    two_way_wins,
)
from mindeye.evaluation.report import (
    METRIC_COLUMNS,
    WORLD_COLUMNS,
    evaluate_reconstructions,
    save_image_grid,
    world_two_way_wins,
    write_table,
)

__all__ = [
    "ClipTokenFeatures",
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "METRIC_COLUMNS",
    "MetricUnavailable",
    "build_feature_extractor",
    "correlation_distance",
    "evaluate_reconstructions",
    "paired_difference",
    "pixcorr",
    "random_alexnet_features",
    "save_image_grid",
    "ssim",
    "two_way_identification",
    "two_way_wins",
    "WORLD_COLUMNS",
    "WORLD_FEATURE_EXTRACTORS",
    "world_feature_extractors",
    "world_two_way_wins",
    "write_table",
]
