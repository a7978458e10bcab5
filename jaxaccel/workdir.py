"""The names of the files a run writes into its workdir, defined once.

Every module that reads or writes a workdir (the pipeline, loading, artifacts, sweeps, the
metric writer) takes the names from here, so "results.json" has one spelling and one meaning.
Imports nothing of jaxaccel.
"""
CONFIG_FILE = "config.json"            # the resolved config (config.to_json)
DATASET_FILE = "dataset.json"          # image shape, normalisation, class names, split sizes
RESULTS_FILE = "results.json"          # what a finished run reports (loop.results_record)
METRICS_FILE = "metrics.jsonl"         # one strict-JSON row per line (metrics.MetricWriter)
CALIBRATION_FILE = "calibration.json"  # a quantize stage's activation ranges (quant.save_calibration)
CONV_IMPL_FILE = "conv_impl.json"      # what conv_impl "auto" meant for the run (autotune.Choice)
ENSEMBLE_FILE = "ensemble.json"        # an ensemble run's combination (members, weights)
CHECKPOINTS_DIR = "checkpoints"        # orbax checkpoints (checkpoint.Checkpointer)
EVENTS_DIR = "events"                  # TensorBoard event files
MEMBERS_DIR = "members"                # an ensemble's members: member<k>/ (rows, or whole runs)
