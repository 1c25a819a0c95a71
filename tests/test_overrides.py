"""Misspelled keys, groups and options: one line with the closest match, before Hydra runs."""

import pytest

from gradcam_batch import UserError
from gradcam_batch.cli import CONFIG_DIR
from gradcam_batch.overrides import check_overrides, override_tokens


@pytest.mark.parametrize("argument, message", [
    ("data.batchsize=4", "'data.batchsize' is not a setting of gradcam-batch; did you mean data.batch_size?"),
    ("dta.root=x", "'dta.root' is not a setting of gradcam-batch; did you mean data?"),
    ("data=imagefolders", "data='imagefolders' is not an option of data; did you mean imagefolder?"),
    ("model.target_layr=layer4", "did you mean model.target_layer?"),
    ("cam.method.x=1", "'cam.method.x' is not a setting"),
])
def test_typos_are_one_line_with_a_suggestion(argument, message):
    with pytest.raises(UserError) as error:
        check_overrides(["runtime.progress=false", argument], CONFIG_DIR)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("arguments", [
    ["data=webdataset", "data.shards=[a.tar,b.tar]", "+hydra.job.name=x", "hydra/launcher=basic"],
    ["-m", "cam.method=gradcam,layercam", "data=demo,imagefolder"],
    ["--config-name", "config", "cam.topk=3", "~output.overwrite"],
])
def test_valid_overrides_pass(arguments):
    check_overrides(arguments, CONFIG_DIR)


def test_flags_and_their_values_are_not_overrides():
    assert override_tokens(["-cn", "x=y", "--multirun", "a=b"]) == ["a=b"]
