r"""Reproduction: per-layer sensitivity and allocation (Han et al. 2015, Fig. 5; the
sensitivity-driven per-layer sparsity of NNCF / Distiller) against uniform pruning at the same
package size — LeNet-300-100 on mnist5k (10% of the training images held out for validation),
3 seeds.

Per seed (scripts/reproduce_allocation.sh runs these steps itself: each arm starts from its
seed's dense run and from that run's allocation, so they are no static sweep):
  1. `dense` — DENSE_STEPS of dense training (`--config.stages='()'`: one train stage of
     `num_steps`);
  2. `jaxaccel compress sensitivity` on the dense run, on the VALIDATION split, with the grid
     SENSITIVITY_SPARSITIES and weight bits BITS only (the pipeline's quantize stage takes one
     weight bit width, so the allocation chooses the sparsities; every arm is coded at BITS),
     and `--target-bytes` = the package bytes of the dense weights pruned uniformly to S
     (`target_bytes`), for each S in SIZES;
  3. three pipelines from the dense weights (`init_from`) per S, all this file's stages:
     `prune` (one-shot magnitude, `per_layer`) -> `finetune` FINETUNE_STEPS at the dense lr ->
     `w8a8` post-training quantization (weights BITS bits per channel, activations 8 bits,
     fake-quant), differing only in the per-layer sparsities:
       * `allocated_S`: the allocation's (its bytes are at most the target);
       * `uniform_S`:   S in every layer (the target's bytes);
       * `global_S`:    those of one global magnitude threshold at S on the dense weights
                        (`global_per_layer`; the same nonzeros in total: the free non-uniform
                        baseline).
The allocation is selected on validation only; test accuracy is reported beside it. Steps,
lr, grid and sizes are fixed in advance (see REPRODUCTIONS.md for the pilot that set the
fine-tuning).

One arm by hand:
  jaxaccel train --config experiments/repro_allocation.py --workdir runs/a/dense_seed0 \
      --config.stages='()'
  jaxaccel compress sensitivity runs/a/dense_seed0 --bits 8 --target-bytes 49865 \
      --sparsities 0.5,0.7,0.8,0.9,0.93,0.95,0.96,0.97,0.98,0.985,0.99,0.995
  jaxaccel train --config experiments/repro_allocation.py --workdir runs/a/uniform_0.95_seed0 \
      --config.init_from=runs/a/dense_seed0
  (`python experiments/repro_allocation.py overrides SENSITIVITY_JSON` prints the
  `--config.stages.0.prune.per_layer.<layer>=<s>` overrides of an allocation; `target`,
  `uniform` and `global` the others, see the end of this file.)
The reproduction (3 seeds, table):
  scripts/reproduce_allocation.sh
"""
import sys

from jaxaccel import sweep
from jaxaccel.config import default_config
from jaxaccel.stages import stage

LR = 1.2e-3
DENSE_STEPS = 2000
FINETUNE_STEPS = 1000
BITS = 8
SIZES = (0.95, 0.98)  # uniform sparsities whose package bytes are the allocation's targets
SENSITIVITY_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99,
                          0.995)
LAYERS = ("fc1/kernel", "fc2/kernel", "fc3/kernel")
SEEDS = 3


def arm_stages(per_layer: dict) -> tuple:
    """prune (per-layer sparsities) -> fine-tune at the dense lr -> W{BITS}A8 PTQ (fake-quant)."""
    return (stage("prune", "prune", prune={"method": "one_shot", "per_layer": dict(per_layer)}),
            stage("finetune", "train", steps=FINETUNE_STEPS, optimizer={"lr": LR}),
            stage("w8a8", "quantize", quant={"mode": "ptq", "weight_bits": BITS, "act_bits": 8,
                                             "per_channel": True, "int8": False}))


def get_config():
    config = default_config()
    config.dataset.name = "mnist5k"
    config.dataset.validation_split = 0.1
    config.model.name = "lenet300_100"
    config.batch_size = 60
    config.eval_batch_size = 1000
    config.num_steps = DENSE_STEPS  # the dense run: --config.stages='()'
    config.optimizer.name = "adam"
    config.optimizer.lr = LR
    config.log_every = 500
    config.checkpoint_every = 5000
    config.progress = False
    config.parallel.num_devices = 1
    config.stages = arm_stages({layer: SIZES[0] for layer in LAYERS})
    return config


def get_sweep():
    """The seeds (the script loops over them; see the module doc)."""
    return sweep.seeds(SEEDS)


def uniform_per_layer(sparsity: float) -> dict:
    return {layer: float(sparsity) for layer in LAYERS}


def target_bytes(dense_workdir: str, sparsity: float, bits: int = BITS) -> int:
    """Package bytes (`compress.package.kernel_bytes` + biases) of the run's final weights with
    every kernel magnitude-pruned to `sparsity` and coded at `bits`: the uniform arm's size,
    counted as `jaxaccel compress sensitivity` counts an allocation's."""
    from jaxaccel import loading
    from jaxaccel.compress import package, sensitivity

    run = loading.final_weights(dense_workdir)
    sizes = sensitivity.layer_sizes(run.model, run.variables, run.input_shape)
    return sizes["fixed_bytes"] + sum(
        package.kernel_bytes(i["size"], sensitivity.kept(i["size"], i["nonzeros"], sparsity),
                             i["channels"], bits) for i in sizes["layers"].values())


def global_per_layer(dense_workdir: str, sparsity: float) -> dict:
    """Per-layer sparsities (pruned / size, exact) of one global magnitude threshold pruning
    `sparsity` of all kernels of the run's final weights (`prune.magnitude_masks`,
    scope="global"); per-layer magnitude pruning to them gives the same masks."""
    import numpy as np

    from jaxaccel import loading
    from jaxaccel.compress import prune

    params = loading.final_weights(dense_workdir).variables["params"]
    masks = prune.magnitude_masks(params, sparsity, scope="global")
    out = {}
    for path, mask in prune.named_leaves(masks):
        if path in LAYERS:
            mask = np.asarray(mask)
            out[path] = float(np.count_nonzero(~mask) / mask.size)
    return out


def allocation_overrides(record: dict) -> list[str]:
    """The `--config.stages.0.prune.per_layer.<layer>=<sparsity>` overrides of a
    `jaxaccel compress sensitivity` record's allocation (every layer, bits checked)."""
    alloc = record.get("allocation")
    if not alloc:
        raise ValueError("the sensitivity record has no allocation (run it with --target-bytes)")
    per_layer = alloc["prune_per_layer"]
    if set(per_layer) != set(LAYERS):
        raise ValueError(f"allocation layers {sorted(per_layer)} are not {list(LAYERS)}")
    if set(alloc["bits_per_layer"].values()) != {BITS}:
        raise ValueError(f"allocation bits {alloc['bits_per_layer']} are not all {BITS}")
    return overrides(per_layer)


def overrides(per_layer: dict) -> list[str]:
    return [f"--config.stages.0.prune.per_layer.{layer}={float(per_layer[layer])!r}"
            for layer in LAYERS]


if __name__ == "__main__":  # helpers of scripts/reproduce_allocation.sh
    import json

    command, args = sys.argv[1], sys.argv[2:]
    if command == "settings":    # sizes, the sensitivity grid, bits: one line each
        print(" ".join(map(str, SIZES)), ",".join(map(str, SENSITIVITY_SPARSITIES)), BITS,
              sep="\n")
    elif command == "target":      # target DENSE_WORKDIR SPARSITY
        print(target_bytes(args[0], float(args[1])))
    elif command == "overrides":  # overrides SENSITIVITY_JSON: one override per line
        with open(args[0]) as f:
            print("\n".join(allocation_overrides(json.load(f))))
    elif command == "global":    # global DENSE_WORKDIR SPARSITY: one override per line
        print("\n".join(overrides(global_per_layer(args[0], float(args[1])))))
    elif command == "uniform":   # uniform SPARSITY: one override per line
        print("\n".join(overrides(uniform_per_layer(float(args[0])))))
    else:
        raise SystemExit(f"unknown command {command!r}: settings | target | overrides | "
                         f"uniform | global")
