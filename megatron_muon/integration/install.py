"""`megatron_muon.install()`: route `--optimizer muon` / `OptimizerConfig(optimizer="muon")` to this plugin.

Hooks (megatron-core 0.19.2; each is a module attribute that Megatron looks up at call time):

- `megatron.core.optimizer.get_megatron_optimizer` (and the copy `megatron.training.training` imported):
  `optimizer == "muon"` builds `build_muon_optimizer`; `"nvidia_muon"` builds megatron-core's own Muon;
  everything else is untouched.
- `megatron.training.training.OptimizerConfig` -> `MuonOptimizerConfig`, so configs built from args carry the
  plugin's fields.
- `megatron.training.arguments.add_megatron_arguments`: adds the plugin's flags and the paper's defaults.
- `validate_args` (in `arguments` and the copy in `initialize`): Megatron rewrites `--use-distributed-optimizer`
  to its layer-wise optimizer for any optimizer but adam / sgd; the plugin's Muon runs inside Megatron's
  standard `DistributedOptimizer`, so it is validated as adam would be. Then the muP flags are resolved.
- `megatron.training.training.get_model`: with a muP preset, the built model gets the preset's per-matrix init
  and its parameters their muP tags (`megatron/mup.py`); `get_mup_config_overrides` then yields nothing, since
  `get_megatron_optimizer` turns the tags into param-group overrides for any optimizer.

Code that imported `get_megatron_optimizer` by name before `install()` keeps the original: call `install()`
first (the launcher does), or call it through its module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

_installed = False


def install() -> None:
    """Install the hooks (idempotent). megatron.training hooks are skipped if that package is absent."""
    global _installed
    if _installed:
        return
    import megatron.core.optimizer as mcore_optimizer

    original = mcore_optimizer.get_megatron_optimizer

    @functools.wraps(original)
    def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True,
                               pg_collection=None, **kwargs):
        if config.optimizer == "muon":
            from megatron_muon.integration.optimizer import build_muon_optimizer

            return build_muon_optimizer(config, model_chunks, config_overrides, use_gloo_process_groups, pg_collection)
        if config.optimizer == "nvidia_muon":
            config = dataclasses.replace(config, optimizer="muon")
        from megatron_muon.integration.mup import mup_config_overrides

        mup_overrides = mup_config_overrides(config, model_chunks)
        if mup_overrides:  # a muP preset with Megatron's own optimizers (the AdamW baseline)
            base = mcore_optimizer.get_standard_config_overrides(config) if config_overrides is None else config_overrides
            config_overrides = {**base, **mup_overrides}
        return original(config, model_chunks, config_overrides, use_gloo_process_groups, pg_collection, **kwargs)

    mcore_optimizer.get_megatron_optimizer = get_megatron_optimizer
    _install_training_hooks(get_megatron_optimizer)
    _installed = True


def _install_training_hooks(get_megatron_optimizer) -> None:
    try:
        arguments = importlib.import_module("megatron.training.arguments")
        initialize = importlib.import_module("megatron.training.initialize")
        training = importlib.import_module("megatron.training.training")
    except ImportError:
        return
    from megatron_muon.integration.flags import (
        MuonOptimizerConfig,
        add_muon_arguments,
        mup_widths_from_args,
        resolve_adam_betas,
        resolve_mup_args,
    )
    from megatron_muon.integration.mup import MupSpec, apply_mup

    training.get_megatron_optimizer = get_megatron_optimizer
    training.OptimizerConfig = MuonOptimizerConfig

    original_add = arguments.add_megatron_arguments

    @functools.wraps(original_add)
    def add_megatron_arguments(parser):
        parser = original_add(parser)
        add_muon_arguments(parser)
        return parser

    arguments.add_megatron_arguments = add_megatron_arguments

    original_validate = arguments.validate_args

    @functools.wraps(original_validate)
    def validate_args(args, defaults={}):  # noqa: B006 (Megatron's signature)
        validated = validate_as_megatron(args, defaults)
        resolve_mup_args(args)
        return validated

    def validate_as_megatron(args, defaults):
        resolve_adam_betas(args)
        # The plugin's Muon validates as adam: --use-distributed-optimizer keeps meaning Megatron's
        # DistributedOptimizer. NVIDIA's validates as what megatron-core calls it.
        validate_as = {"muon": "adam", "nvidia_muon": "muon"}.get(args.optimizer)
        if validate_as is None:
            return original_validate(args, defaults)
        chosen, args.optimizer = args.optimizer, validate_as
        print_args = arguments._print_args

        def print_chosen(title, printed):
            # validate_args ends by printing every argument: show the optimizer the user chose.
            printed.optimizer = chosen
            try:
                print_args(title, printed)
            finally:
                printed.optimizer = validate_as

        arguments._print_args = print_chosen
        try:
            return original_validate(args, defaults)
        finally:
            args.optimizer = chosen
            arguments._print_args = print_args

    arguments.validate_args = validate_args
    initialize.validate_args = validate_args

    original_get_model = training.get_model

    @functools.wraps(original_get_model)
    def get_model(*args, **kwargs):
        model = original_get_model(*args, **kwargs)
        run_args = training.get_args()
        if run_args.use_mup and run_args.mup_preset is not None:
            base, _ = mup_widths_from_args(run_args)
            trains_matrices = "muon" if run_args.optimizer in ("muon", "nvidia_muon") else "adam"
            apply_mup(model, MupSpec(run_args.mup_preset, base, trains_matrices))
        return model

    training.get_model = get_model
    original_mup_overrides = training.get_mup_config_overrides

    @functools.wraps(original_mup_overrides)
    def get_mup_config_overrides(*args, **kwargs):
        # With a preset, the LR / eps / WD multipliers come from the parameters' muP tags (get_megatron_optimizer).
        if training.get_args().mup_preset is not None:
            return {}
        return original_mup_overrides(*args, **kwargs)

    training.get_mup_config_overrides = get_mup_config_overrides
    _use_prebuilt_dataset_helpers()


def _use_prebuilt_dataset_helpers() -> None:
    """initialize_megatron runs `make -C megatron/core/datasets` to build the dataset index helpers. The
    megatron-core wheel ships them prebuilt (helpers_cpp*.so) but without the Makefile, so `make` fails and
    Megatron exits, on any device. When the prebuilt module imports there is nothing to compile; a Megatron-LM
    source tree (Makefile present) is left alone."""
    import os

    import megatron.core.datasets.utils as dataset_utils

    if os.path.exists(os.path.join(os.path.dirname(dataset_utils.__file__), "Makefile")):
        return
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
    except ImportError:
        return
    dataset_utils.compile_helpers = lambda: None
