"""`megatron_muon.install()`: route `--optimizer muon` / `OptimizerConfig(optimizer="muon")` to this plugin.

Before anything is patched, `compat.check_megatron` compares the installed megatron-core with the supported range
and every symbol listed in `compat.py` (the one list of Megatron touch points); a mismatch raises naming the
symbol and both versions.

Hooks (megatron-core 0.19.2):

- `megatron.core.optimizer._get_megatron_emerging_optimizer`: the point megatron-core's own
  `get_megatron_optimizer` resolves at call time for every optimizer but adam / sgd. Routing `muon` here makes it
  reach the plugin even through a `get_megatron_optimizer` that user code imported by name before `install()`.
- `megatron.core.optimizer.get_megatron_optimizer` (and the copy `megatron.training.training` imported):
  `optimizer == "muon"` builds `build_muon_optimizer`; `"nvidia_muon"` builds megatron-core's own Muon; with a
  muP preset, Megatron's own optimizers get the preset's param-group overrides; everything else is untouched.
- `megatron.training.training.OptimizerConfig` -> `MuonOptimizerConfig`, so configs built from args carry the
  plugin's fields.
- `megatron.training.arguments.add_megatron_arguments`: adds the plugin's flags and the paper's defaults.
- `megatron.training.arguments.validate_args`: Megatron rewrites `--use-distributed-optimizer` to its layer-wise
  optimizer for any optimizer but adam / sgd; the plugin's Muon runs inside Megatron's standard
  `DistributedOptimizer`, so it is validated as adam would be. Then the plugin's own checks run (flags that the
  plugin's Muon cannot honour are refused here, before the model is built) and the muP flags are resolved.
- `megatron.training.yaml_arguments.validate_yaml`: `--yaml-cfg` replaces the command line by Megatron's
  experimental YAML arguments, which skip `validate_args`; a YAML asking for Muon is refused there.
- `megatron.training.training.get_model`: with a muP preset, the built model gets the preset's per-matrix init
  and its parameters their muP tags (`integration/mup.py`); `get_mup_config_overrides` then yields nothing, since
  `get_megatron_optimizer` turns the tags into param-group overrides for any optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util

_installed = False
# Set while megatron-core builds its own Muon for optimizer="nvidia_muon" (which it knows as "muon").
_building_nvidia_muon = False


def install() -> None:
    """Install the hooks (idempotent). megatron.training hooks are skipped if that package is absent."""
    global _installed
    if _installed:
        return
    from megatron_muon.integration.compat import check_megatron

    check_megatron(include_training=importlib.util.find_spec("megatron.training") is not None)
    import megatron.core.optimizer as mcore_optimizer

    original = mcore_optimizer.get_megatron_optimizer
    original_emerging = mcore_optimizer._get_megatron_emerging_optimizer

    @functools.wraps(original_emerging)
    def _get_megatron_emerging_optimizer(config, model_chunks, config_overrides=None, pg_collection=None):
        if config.optimizer == "muon" and not _building_nvidia_muon:
            from megatron_muon.integration.optimizer import build_muon_optimizer

            return build_muon_optimizer(config, model_chunks, config_overrides, True, pg_collection)
        return original_emerging(config, model_chunks, config_overrides, pg_collection)

    @functools.wraps(original)
    def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True,
                               pg_collection=None, dump_param_to_param_group_map=None):
        if config.optimizer == "muon":
            from megatron_muon.integration.optimizer import build_muon_optimizer

            if dump_param_to_param_group_map is not None:
                raise ValueError("--dump-param-to-param-group-map is not supported with megatron-muon's --optimizer "
                                 "muon (its param groups are the plugin's Muon / AdamW split); drop the flag")
            return build_muon_optimizer(config, model_chunks, config_overrides, use_gloo_process_groups, pg_collection)
        from megatron_muon.integration.mup import mup_config_overrides

        mup_overrides = mup_config_overrides(config, model_chunks)
        if mup_overrides:  # a muP preset with Megatron's own optimizers (the AdamW baseline)
            base = mcore_optimizer.get_standard_config_overrides(config) if config_overrides is None else config_overrides
            config_overrides = {**base, **mup_overrides}
        build = functools.partial(original, model_chunks=model_chunks, config_overrides=config_overrides,
                                  use_gloo_process_groups=use_gloo_process_groups, pg_collection=pg_collection,
                                  dump_param_to_param_group_map=dump_param_to_param_group_map)
        if config.optimizer != "nvidia_muon":
            return build(config)
        with _nvidia_muon():
            return build(dataclasses.replace(config, optimizer="muon", **nvidia_muon_fields(config)))

    mcore_optimizer._get_megatron_emerging_optimizer = _get_megatron_emerging_optimizer
    mcore_optimizer.get_megatron_optimizer = get_megatron_optimizer
    _install_training_hooks(get_megatron_optimizer)
    _installed = True


def nvidia_muon_fields(config) -> dict:
    """The plugin's flag values in megatron-core's Muon vocabulary, so a flag means the same update for both.

    megatron-core knows Jordan's coefficients as "simple" and has no "essential" scale mode; the paper's
    0.2 sqrt(max(m, n)) is its "spectral" sqrt(max(m, n)) with the extra factor 0.2.
    """
    fields = {}
    if config.muon_coefficient_type == "jordan":
        fields["muon_coefficient_type"] = "simple"
    if config.muon_scale_mode == "essential":
        fields.update(muon_scale_mode="spectral", muon_extra_scale_factor=0.2 * config.muon_extra_scale_factor)
    return fields


@contextlib.contextmanager
def _nvidia_muon():
    global _building_nvidia_muon
    _building_nvidia_muon = True
    try:
        yield
    finally:
        _building_nvidia_muon = False


def refuse_yaml_muon(args) -> None:
    """`--yaml-cfg` replaces the whole command line by Megatron's experimental YAML arguments and validates them with
    `validate_yaml`, not `validate_args`: the plugin's flags, defaults and checks are not part of that path."""
    if getattr(args, "optimizer", None) in ("muon", "nvidia_muon"):
        raise ValueError(
            f"--yaml-cfg {getattr(args, 'yaml_cfg', '')}: optimizer {args.optimizer} through Megatron's experimental "
            f"YAML arguments skips megatron-muon's flags and checks (--muon-*, --mup-preset); give the arguments on "
            f"the command line instead"
        )


def refuse_unsupported_args(args) -> None:
    """Megatron features the plugin's Muon cannot run yet: refused at argument validation, naming the flag."""
    if args.optimizer != "muon":
        return
    for flag, on in (("--use-torch-fsdp2", args.use_torch_fsdp2), ("--use-megatron-fsdp", args.use_megatron_fsdp)):
        if on:
            raise ValueError(
                f"{flag}: FSDP (ZeRO-3) shards parameters, and megatron-muon's --optimizer muon does not run under "
                f"FSDP yet; use --use-distributed-optimizer (ZeRO-1 sharded optimizer state), or --optimizer "
                f"nvidia_muon / adam with FSDP (docs/compatibility.md)"
            )
    for flag, on in (("--use-precision-aware-optimizer", args.use_precision_aware_optimizer),
                     ("--optimizer-cpu-offload", args.optimizer_cpu_offload)):
        if on:
            raise ValueError(f"{flag}: megatron-muon's --optimizer muon keeps fp32 main params and its state on the "
                             f"GPU inside Megatron's standard wrappers; {flag} is not supported (drop it)")
    if args.muon_scalar_optimizer != "adam":
        raise ValueError(
            f"--muon-scalar-optimizer {args.muon_scalar_optimizer}: megatron-muon's --optimizer muon trains the "
            f"non-matrix parameters with AdamW (the paper's recipe); only 'adam' is supported"
        )
    if args.dump_param_to_param_group_map is not None:
        raise ValueError("--dump-param-to-param-group-map: not supported with megatron-muon's --optimizer muon (its "
                         "param groups are the plugin's Muon / AdamW split); drop the flag")
    if args.num_distributed_optimizer_instances != 1:
        raise ValueError(
            f"--num-distributed-optimizer-instances {args.num_distributed_optimizer_instances}: megatron-muon's "
            f"--optimizer muon plans each matrix's orthogonalization over one distributed-optimizer instance; "
            f"several instances are not supported yet (use 1, the default)"
        )


def _install_training_hooks(get_megatron_optimizer) -> None:
    try:
        arguments = importlib.import_module("megatron.training.arguments")
        training = importlib.import_module("megatron.training.training")
        yaml_arguments = importlib.import_module("megatron.training.yaml_arguments")
    except ImportError:
        return
    from megatron_muon.integration.flags import (
        MuonOptimizerConfig,
        add_muon_arguments,
        mup_widths_from_args,
        resolve_adam_betas,
        resolve_mup_args,
        validate_muon_config,
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
        refuse_unsupported_args(args)  # first: Megatron's own checks would fail on them with unrelated messages
        validated = validate_as_megatron(args, defaults)
        if args.optimizer == "muon":
            # Ranges and combinations now, before the model; the device check waits for the optimizer build.
            validate_muon_config(args)
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

    original_validate_yaml = yaml_arguments.validate_yaml

    @functools.wraps(original_validate_yaml)
    def validate_yaml(args, defaults={}):  # noqa: B006 (Megatron's signature)
        refuse_yaml_muon(args)
        return original_validate_yaml(args, defaults)

    yaml_arguments.validate_yaml = validate_yaml

    original_get_model = training.get_model

    @functools.wraps(original_get_model)
    def get_model(*args, **kwargs):
        model = original_get_model(*args, **kwargs)
        run_args = training.get_args()
        # getattr: a --yaml-cfg run's arguments are the YAML's, without the plugin's flags.
        if getattr(run_args, "use_mup", False) and getattr(run_args, "mup_preset", None) is not None:
            base, _ = mup_widths_from_args(run_args)
            trains_matrices = "muon" if run_args.optimizer in ("muon", "nvidia_muon") else "adam"
            apply_mup(model, MupSpec(run_args.mup_preset, base, trains_matrices))
        return model

    training.get_model = get_model
    original_mup_overrides = training.get_mup_config_overrides

    @functools.wraps(original_mup_overrides)
    def get_mup_config_overrides(*args, **kwargs):
        # With a preset, the LR / eps / WD multipliers come from the parameters' muP tags (get_megatron_optimizer).
        if getattr(training.get_args(), "mup_preset", None) is not None:
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
