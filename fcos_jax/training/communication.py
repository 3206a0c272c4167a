"""What the compiled train and predict steps move between devices, for a config and a mesh.

Each program is compiled for abstract inputs (no weights, no data: compiling is enough) exactly as
`train.py` and `eval.py` build it, and its collectives are read from the compiled HLO
(`fcos_jax.parallel.collectives`). `accelerator=True` traces XLA's own convolutions only
(`cpu_kernels.accelerator_kernels`), the program a GPU or TPU would compile, while compiling here.
Used by the tests of the data-parallel contract and by `benchmarks/accelerator_check.py`.
"""

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fcos_jax.checkpoint import store
from fcos_jax.evaluation import evaluator
from fcos_jax.models import build_model, cpu_kernels
from fcos_jax.parallel import collectives, sharding
from fcos_jax.training import optim, train_step


def _traced_as(accelerator: bool):
    return cpu_kernels.accelerator_kernels() if accelerator else contextlib.nullcontext()


def _compiled_text(step: Any, replicated: Any, batch: dict[str, Any], mesh: Mesh) -> str:
    """HLO text of the jitted `step` compiled for `replicated` (state or weights, replicated)
    and `batch` (split over `data`), both abstract."""
    lowered = step.lower(
        sharding.abstract(replicated, sharding.replicated(mesh)),
        sharding.abstract(batch, sharding.batch_sharding(mesh)),
    )
    return lowered.compile().as_text()


def parameter_bytes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """{'all': bytes of every parameter, 'trainable': of those the optimizer updates,
    'batch_stats': of the BatchNorm statistics (mean and variance per channel)}."""
    shapes = store.abstract_variables(config.model)
    labels = jax.tree.leaves(optim.param_labels(shapes["params"], config))
    sizes = [x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes["params"])]
    trainable = [size for size, label in zip(sizes, labels, strict=True) if label != optim.FROZEN]
    stats = [x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes["batch_stats"])]
    return {"all": int(sum(sizes)), "trainable": int(sum(trainable)), "batch_stats": sum(stats)}


def train_step_hlo(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    image_hw: tuple[int, int],
    *,
    accelerator: bool = False,
) -> str:
    """Compiled HLO of the train step for `config` (its `train.batch_size` and
    `train.accumulate_steps`) on `mesh`, images of `image_hw`."""
    model = build_model(config.model)
    batch_size, max_boxes = int(config.train.batch_size), int(config.data.max_boxes)
    with _traced_as(accelerator):
        params = store.abstract_variables(config.model)["params"]
        optimizer, schedule, labels = optim.build_optimizer(config, params, 1000)
        state = jax.eval_shape(
            lambda: train_step.create_train_state(model, optimizer, jax.random.PRNGKey(0), image_hw)
        )
        batch = {
            "image": jax.ShapeDtypeStruct((batch_size, *image_hw, 3), jnp.float32),
            "boxes": jax.ShapeDtypeStruct((batch_size, max_boxes, 4), jnp.float32),
            "labels": jax.ShapeDtypeStruct((batch_size, max_boxes), jnp.int32),
            "box_valid": jax.ShapeDtypeStruct((batch_size, max_boxes), jnp.bool_),
        }
        step = train_step.jit_train_step(
            train_step.make_train_step(config, model, optimizer, schedule, labels, mesh), mesh
        )
        return _compiled_text(step, state, batch, mesh)


def predict_step_hlo(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    image_hw: tuple[int, int],
    *,
    accelerator: bool = False,
) -> str:
    """Compiled HLO of the evaluation's predict step (`evaluator.make_predict_step`) for a global
    batch of `test.batch_size` rounded up to the mesh, images of `image_hw`."""
    batch_size = evaluator.eval_batch_size(config, mesh)
    variables = store.abstract_variables(config.model)
    with _traced_as(accelerator):
        batch = {
            "image": jax.ShapeDtypeStruct((batch_size, *image_hw, 3), jnp.float32),
            "image_hw": jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
            "scale": jax.ShapeDtypeStruct((batch_size, 2), jnp.float32),
            "original_hw": jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
            "image_id": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "example_valid": jax.ShapeDtypeStruct((batch_size,), jnp.bool_),
        }
        return _compiled_text(evaluator.make_predict_step(config, mesh), variables, batch, mesh)


def report(hlo_text: str) -> dict[str, Any]:
    """The collectives of a compiled program summed up: counts and bytes per kind, how many run
    inside while loops, and the largest all-reduce's payload."""
    found = collectives.collectives(hlo_text)
    reduce_bytes = [c.bytes for c in found if c.kind == "all-reduce"]
    return {
        **collectives.summary(found),
        "largest all-reduce bytes": int(np.max(reduce_bytes, initial=0)),
    }
