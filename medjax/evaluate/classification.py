"""Classification results with bootstrap intervals, calibration, tables and plots: the names of
`medjax.metrics` (which training selects checkpoints with) under their old address."""

from medjax.metrics.bootstrap import (  # noqa: F401
    CONFIDENCE,
    N_BOOT,
    Interval,
    bootstrap,
    bootstrap_ci,
    resample_indices,
)
from medjax.metrics.calibration import (  # noqa: F401
    TEMPERATURE_BOUNDS,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
)
from medjax.metrics.classification import (  # noqa: F401
    NUM_BINS,
    accuracy,
    balanced_accuracy,
    binary_rates,
    check_inputs,
    class_names_or_indices,
    confusion_matrix,
    f1,
    nll,
    one_vs_rest_rates,
    predict,
    roc_auc,
    youden_threshold,
)
from medjax.metrics.classification_report import (  # noqa: F401
    MULTILABEL_METRICS,
    classification_report,
    format_table,
    headline_metrics,
    multilabel_report,
    write_csv,
)
from medjax.metrics.plots import (  # noqa: F401
    plot_confusion,
    plot_pr,
    plot_reliability,
    plot_roc,
)
