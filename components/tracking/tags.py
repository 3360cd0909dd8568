"""Every `arborl.*` tag key this project writes on MLflow runs and registered model versions, in one place: a
writer and its readers (the registry, the report, the deployments) name the same constant."""

# on every MLflow run of `arborl run`
RUN_ROOT_TAG = "arborl.run_root"  # the output directory it tracks
CONFIG_HASH_TAG = "arborl.config_hash"  # the config it was made with (its params)
CONFIG_FILE_TAG = "arborl.config_file"  # the YAML file it was launched with
SUPERSEDES_TAG = "arborl.supersedes"  # on a run of a root whose config changed: the earlier MLflow run
SEARCH_COLLAPSE_TAG = "arborl.search_collapse"  # tool calls fell below half the warm start's

# on a run's final model (the registry candidate) and on registered versions
WORLD_TAG = "arborl.world"  # the prepare output its evaluations read
WARMSTART_MODEL_TAG = "arborl.warmstart_model"  # the gate's baseline when there is no champion
ITERATION_TAG = "arborl.iteration"  # the iteration whose model it is
RUN_ID_TAG = "arborl.run_id"  # the MLflow run that made it
MODEL_URI_TAG = "arborl.model_uri"  # the model directory it was registered from
WEIGHTS_TAG = "arborl.weights_sha256"  # the digest of those weights: one version per weights
ORIGIN_TAG = "arborl.origin"  # "seed" for `arborl seed-champion`

# lineage of a retrained model
PARENT_VERSION_TAG = "arborl.parent_version"
PARENT_MODEL_URI_TAG = "arborl.parent_model_uri"
DATA_SNAPSHOT_TAG = "arborl.data_snapshot"
DATA_URI_TAG = "arborl.data_uri"
