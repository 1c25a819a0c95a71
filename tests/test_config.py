"""Config validation: every bad value is named with its fix."""

import pytest

from gradcam_batch import UserError
from gradcam_batch.config import CamConfig, DataConfig, ModelConfig, OutputConfig, RuntimeConfig


@pytest.mark.parametrize("make, message", [
    (lambda: DataConfig(batch_size=0), "data.batch_size=0"),
    (lambda: DataConfig(format="tfrecord"), "data.format='tfrecord'"),
    (lambda: DataConfig(resize=100, crop=224), "data.crop=224 is larger than data.resize=100"),
    (lambda: DataConfig(format="imagefolder"), "needs data.root"),
    (lambda: DataConfig(format="parquet"), "needs data.shards"),
    (lambda: ModelConfig(source="torchvision"), "needs model.name"),
    (lambda: ModelConfig(source="checkpoint"), "needs model.weights"),
    (lambda: CamConfig(method="randomcam"), "cam.method='randomcam'"),
    (lambda: CamConfig(targets="topk", topk=0), "cam.topk=0"),
    (lambda: CamConfig(targets="classes"), "needs cam.classes"),
    (lambda: CamConfig(targets="classes", classes=[-1]), "cam.classes"),
    (lambda: CamConfig(targets="classes", classes=[1, 1]), "repeats"),
    (lambda: DataConfig(device_share=1.5), "data.device_share=1.5"),
    (lambda: DataConfig(device_share=-0.1), "data.device_share=-0.1"),
    (lambda: DataConfig(decode="gpu"), "data.decode='gpu'"),
    (lambda: DataConfig(unit_size=0), "data.unit_size=0"),
    (lambda: DataConfig(max_bytes=0), "data.max_bytes=0"),
    (lambda: OutputConfig(compression="bogus"), "output.compression='bogus'"),
    (lambda: RuntimeConfig(dist_timeout_minutes=0), "runtime.dist_timeout_minutes=0"),
    (lambda: RuntimeConfig(device="tpu"), "runtime.device='tpu'"),
    (lambda: RuntimeConfig(amp="fp8"), "runtime.amp='fp8'"),
])
def test_bad_values_are_named(make, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as error:
        make()
    assert "\n" not in str(error.value)


def test_defaults_are_valid_and_num_targets():
    DataConfig(), ModelConfig(), RuntimeConfig()
    OutputConfig(compression="none"), OutputConfig(compression="snappy")
    assert CamConfig().num_targets == 1
    assert CamConfig(targets="topk", topk=4).num_targets == 4
    assert CamConfig(targets="classes", classes=[1, 2]).num_targets == 2
