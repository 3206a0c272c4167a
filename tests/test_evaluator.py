"""evaluation/evaluator.py: the global evaluation batch on any device count, the model's vs the
data's classes.

Evaluation on real topologies (1 device, 4 devices, 2 processes x 2 devices) runs end to end in
test_train_cli.py.
"""

from types import SimpleNamespace

import pytest

from fcos_jax.config import base as config_base
from fcos_jax.evaluation import evaluator
from fcos_jax.parallel import sharding


@pytest.mark.parametrize(
    ("requested", "devices", "expected"),
    [(1, 1, 1), (3, 1, 3), (1, 4, 4), (3, 4, 4), (8, 4, 8), (5, 4, 8), (3, 2, 4)],
)
def test_the_global_batch_rounds_up_to_the_devices(requested, devices, expected):
    config = config_base.get_base_config()
    config.test.batch_size = requested
    assert evaluator.eval_batch_size(config, SimpleNamespace(size=devices)) == expected


def test_a_non_positive_batch_is_refused_naming_the_field():
    config = config_base.get_base_config()
    config.test.batch_size = 0
    with pytest.raises(ValueError, match="test.batch_size"):
        evaluator.eval_batch_size(config, SimpleNamespace(size=1))


def test_validation_data_with_other_classes_than_the_model_is_refused():
    config = config_base.get_base_config()
    pipeline = SimpleNamespace(
        classes=[(1, "cat"), (2, "dog")], source="mydata validation (annotations/val.json)"
    )
    with pytest.raises(ValueError, match=r"annotations/val.json\): the validation data's classes"):
        evaluator.Evaluator(
            config, sharding.make_mesh(), classes=[(1, "cat"), (3, "bird")], pipeline=pipeline
        )
