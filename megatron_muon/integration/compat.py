"""Every megatron-core / megatron.training symbol the plugin touches, and the check `install()` runs first.

The plugin reaches into Megatron's internals (private functions, wrapper classes it subclasses, module
attributes it replaces). A renamed function or a changed signature in another megatron-core release would
otherwise show up as an AttributeError deep inside the first optimizer step, or worse, as a hook that silently
never runs. `check_megatron()` compares the installed release with the supported range and every symbol below
with the parameters it had when the plugin was written against it, and raises naming the symbol and both
versions before anything is patched.

Each row: (module, dotted attribute, expected parameter names or None for "must exist", how the plugin uses it,
megatron-core version it was written against). `parameters` is checked by name and order, which is what the
plugin's wrappers and subclass overrides rely on.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

WRITTEN_AGAINST = "0.19.2"
# Lowest and first unsupported release; bump after running the suite on the new release.
SUPPORTED = ((0, 19, 0), (0, 20, 0))


@dataclass(frozen=True)
class Touch:
    module: str
    attribute: str
    parameters: tuple[str, ...] | None
    use: str  # "replaced": the plugin swaps in its own; "subclassed" / "overridden"; "called"; "read"
    written_against: str = WRITTEN_AGAINST

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}"


_OPT = "megatron.core.optimizer"
_F16 = "megatron.core.optimizer.optimizer"
_DIST = "megatron.core.optimizer.distrib_optimizer"
_ARGS = "megatron.training.arguments"
_INIT = "megatron.training.initialize"
_TRAIN = "megatron.training.training"

CORE_TOUCHES: tuple[Touch, ...] = (
    # install.py: where optimizer="muon" is routed.
    Touch(_OPT, "get_megatron_optimizer",
          ("config", "model_chunks", "config_overrides", "use_gloo_process_groups", "pg_collection",
           "dump_param_to_param_group_map"), "replaced"),
    # Resolved at call time by any copy of get_megatron_optimizer, so the route holds whatever the import order.
    Touch(_OPT, "_get_megatron_emerging_optimizer", ("config", "model_chunks", "config_overrides", "pg_collection"),
          "replaced"),
    Touch(_OPT, "get_standard_config_overrides", ("config",), "called"),
    # optimizer.py
    Touch(_OPT, "_get_param_groups", ("model_chunks", "config", "config_overrides"), "called"),
    Touch(_OPT, "ChainedOptimizer", None, "subclassed"),
    Touch(_OPT, "OptimizerConfig", None, "subclassed"),
    Touch("megatron.core.optimizer.grad_scaler", "ConstantGradScaler", None, "called"),
    Touch("megatron.core.process_groups_config", "ProcessGroupCollection.setup_process_groups_for_optimizer",
          ("pg_collection", "model_chunks", "use_gloo_process_groups"), "called"),
    Touch("megatron.core.utils", "get_pg_rank", ("group",), "called"),
    Touch(_F16, "Float16OptimizerWithFloat16Params", None, "subclassed"),
    Touch(_F16, "Float16OptimizerWithFloat16Params._unscale_main_grads_and_check_for_nan", ("self",), "overridden"),
    Touch(_F16, "Float16OptimizerWithFloat16Params.sharded_state_dict",
          ("self", "model_sharded_state_dict", "is_loading", "metadata"), "overridden"),
    Touch(_F16, "Float16OptimizerWithFloat16Params.load_state_dict", ("self", "state_dict"), "overridden"),
    # checkpoint.py: the distributed optimizer's state hooks.
    Touch(_DIST, "DistributedOptimizer", None, "subclassed"),
    Touch(_DIST, "DistributedOptimizer._get_model_param_range_map", ("self", "param"), "called"),
    Touch(_DIST, "DistributedOptimizer._get_main_param_and_optimizer_states", ("self", "model_param"), "overridden"),
    Touch(_DIST, "DistributedOptimizer._set_main_param_and_optimizer_states", ("self", "model_param", "tensors"),
          "overridden"),
    Touch(_DIST, "DistributedOptimizer.sharded_param_state_fully_reshardable",
          ("self", "model_sharded_state_dict", "is_loading", "metadata"), "overridden"),
    Touch(_DIST, "DistributedOptimizer.load_parameter_state_from_fully_reshardable", ("self", "state_dict"),
          "overridden"),
    Touch(_DIST, "DistributedOptimizer.sharded_state_dict",
          ("self", "model_sharded_state_dict", "is_loading", "sharding_type", "metadata"), "overridden"),
    Touch(_DIST, "DistributedOptimizer.state_dict", ("self",), "overridden"),
    Touch(_DIST, "DistributedOptimizer.load_state_dict", ("self", "state_dict"), "overridden"),
    Touch("megatron.core.dist_checkpointing.optimizer", "get_param_id_to_sharded_param_map",
          ("model_sharded_state_dict", "optim_params_iter"), "called"),
    Touch("megatron.core.dist_checkpointing.optimizer", "make_sharded_optimizer_tensor",
          ("model_param", "optim_param", "prefix"), "called"),
    Touch("megatron.core.dist_checkpointing.optimizer", "optim_state_to_sharding_state",
          ("optim_state_dict", "id_to_sharded_param_map", "exclude_keys"), "called"),
    # checkpoint.py: the chain, resuming under another expert-parallel size.
    Touch(_F16, "ChainedOptimizer.sharded_state_dict", ("self", "model_sharded_state_dict", "is_loading", "kwargs"),
          "overridden"),
    Touch(_F16, "ChainedOptimizer.load_state_dict", ("self", "state_dict"), "overridden"),
    Touch(_F16, "ChainedOptimizer._synchronize_steps", ("self",), "called"),
    Touch(_F16, "param_group_identifier_keys", None, "read"),
    Touch("megatron.core.dist_checkpointing.dict_utils", "merge", ("x1", "x2", "key"), "called"),
    # optimizer.py: the groups a Muon domain spans (dense: TP x DP x CP; experts: expert TP x expert DP).
    *(Touch("megatron.core.parallel_state", name, None, "called") for name in (
        "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_group",
        "get_data_parallel_rank", "get_data_parallel_world_size", "get_tensor_and_data_parallel_group",
        "get_pipeline_model_parallel_rank", "get_expert_model_parallel_rank", "get_expert_tensor_parallel_rank",
        "get_expert_tensor_parallel_world_size", "get_expert_tensor_parallel_group", "get_expert_data_parallel_rank",
        "get_expert_data_parallel_world_size")),
    # mup.py
    Touch("megatron.core.optimizer.optimizer_config", "ParamKey", None, "called"),
    Touch("megatron.core.optimizer.optimizer_config", "ParamWithNamePredicate", None, "called"),
    # install.py: the wheel ships the dataset helpers prebuilt, without the Makefile compile_helpers runs.
    Touch("megatron.core.datasets.utils", "compile_helpers", (), "replaced"),
)

# Public megatron-core APIs the Megatron-facing tools call (gpt.py, training.py, datasets.py, parallel_state.py):
# existence only, since these are stable, keyword-called and checked by every test that builds a model.
TOOL_TOUCHES: tuple[Touch, ...] = tuple(
    Touch(module, attribute, None, "called") for module, attribute in (
        ("megatron.core.models.gpt.gpt_model", "GPTModel"),
        ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"),
        ("megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_with_transformer_engine_spec"),
        ("megatron.core.transformer.transformer_config", "TransformerConfig"),
        ("megatron.core.distributed", "DistributedDataParallel"),
        ("megatron.core.distributed", "DistributedDataParallelConfig"),
        ("megatron.core.distributed.finalize_model_grads", "finalize_model_grads"),
        ("megatron.core.optimizer_param_scheduler", "OptimizerParamScheduler"),
        ("megatron.core.pipeline_parallel", "get_forward_backward_func"),
        ("megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed"),
        ("megatron.core.parallel_state", "initialize_model_parallel"),
        ("megatron.core.parallel_state", "destroy_model_parallel"),
        ("megatron.core.tokenizers", "MegatronTokenizer"),
        ("megatron.core.datasets.indexed_dataset", "IndexedDatasetBuilder"),
        ("megatron.core.datasets.indexed_dataset", "IndexedDataset"),
        ("megatron.core.datasets.gpt_dataset", "GPTDataset"),
        ("megatron.core.datasets.gpt_dataset", "GPTDatasetConfig"),
        ("megatron.core.datasets.blended_megatron_dataset_builder", "BlendedMegatronDatasetBuilder"),
    )
)

TRAINING_TOUCHES: tuple[Touch, ...] = (
    # training.py: megatron-core's layer-wise optimizer (nvidia_muon) needs megatron.training's DDP wrapper.
    Touch(_TRAIN, "wrap_model_chunks_with_ddp", None, "called"),
    Touch(_ARGS, "add_megatron_arguments", ("parser",), "replaced"),
    Touch(_ARGS, "validate_args", ("args", "defaults"), "replaced"),
    Touch(_ARGS, "_print_args", ("title", "args"), "replaced"),
    Touch("megatron.training.yaml_arguments", "validate_yaml", ("args", "defaults"), "replaced"),
    Touch(_TRAIN, "get_megatron_optimizer", None, "replaced"),
    Touch(_TRAIN, "OptimizerConfig", None, "replaced"),
    Touch(_TRAIN, "get_model", None, "replaced"),
    Touch(_TRAIN, "get_mup_config_overrides", None, "replaced"),
    Touch(_TRAIN, "get_args", (), "called"),
)

# cpu_shims.py (CPU machines only).
CPU_SHIM_TOUCHES: tuple[Touch, ...] = (
    Touch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", ("device", "clone", "graph_safe"),
          "replaced"),
    Touch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", ("new_state", "device", "graph_safe"),
          "replaced"),
    Touch(_ARGS, "get_device_arch_version", (), "replaced"),
    Touch(_INIT, "initialize_megatron", None, "replaced"),
    Touch(_INIT, "_warmup_jit_function", None, "replaced"),
    Touch(_TRAIN, "initialize_megatron", None, "replaced"),
)


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is outside the tested range or lacks a symbol the plugin touches."""


def installed_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def _release(version: str) -> tuple[int, int, int]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))


def _resolve(touch: Touch):
    """The live object, or raise naming what is missing."""
    try:
        obj = importlib.import_module(touch.module)
    except ImportError as err:
        raise LookupError(f"module {touch.module} cannot be imported ({err})") from None
    for part in touch.attribute.split("."):
        if not hasattr(obj, part):
            raise LookupError(f"{touch.name} does not exist")
        obj = getattr(obj, part)
    return obj


def problems(touches, version: str) -> list[str]:
    """One line per symbol that is missing or whose parameters changed."""
    found = []
    for touch in touches:
        try:
            obj = _resolve(touch)
        except LookupError as err:
            found.append(f"{err} (the plugin {touch.use} it; written against megatron-core {touch.written_against}, "
                         f"installed {version})")
            continue
        if touch.parameters is None:
            continue
        try:
            actual = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            continue  # a builtin without a signature: existence is all that can be checked
        if actual != touch.parameters:
            found.append(f"{touch.name} takes ({', '.join(actual)}); the plugin {touch.use} it as "
                         f"({', '.join(touch.parameters)}) (written against megatron-core {touch.written_against}, "
                         f"installed {version})")
    return found


def check_megatron(include_training: bool, include_cpu_shims: bool = False) -> None:
    """Raise MegatronVersionError before anything is patched if this megatron-core cannot carry the plugin."""
    version = installed_version()
    low, high = SUPPORTED
    if not low <= _release(version) < high:
        raise MegatronVersionError(
            f"megatron-muon supports megatron-core >= {'.'.join(map(str, low))}, < {'.'.join(map(str, high))} "
            f"(written against {WRITTEN_AGAINST}); installed: {version}. Install megatron-core=={WRITTEN_AGAINST}."
        )
    touches = list(CORE_TOUCHES + TOOL_TOUCHES)
    if include_training:
        touches += TRAINING_TOUCHES
    if include_cpu_shims:
        touches += CPU_SHIM_TOUCHES
    found = problems(touches, version)
    if found:
        raise MegatronVersionError("megatron-muon cannot install on this megatron-core:\n  " + "\n  ".join(found))
