"""The efficientnet-lite plugin ships real ImageNet weights: a cat photo must look like a cat."""

import pytest
import torch

from autotransfer.backbones import create_model, get_backbone, list_backbones
from autotransfer.features import eval_transform
from autotransfer.plan import Plan
from autotransfer.strategies import Preprocessing

pytestmark = pytest.mark.slow
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_chelsea_is_a_cat(name: str) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    spec = get_backbone(name)
    assert spec.package == "autotransfer-efficientnet-lite"
    model = create_model(spec, "pretrained", num_classes=1000).eval()
    prep = Preprocessing.for_plan(spec, Plan(name))
    image = eval_transform(prep)(Image.fromarray(skimage_data.chelsea())).unsqueeze(0)
    with torch.inference_mode():
        top5 = model(image).softmax(1)[0].topk(5).indices.tolist()
    assert top5[0] in CAT_CLASSES, top5
    assert sum(i in CAT_CLASSES for i in top5) >= 2, top5


def test_plugin_listed_with_package() -> None:
    names = {s.name: s.package for s in list_backbones()}
    for variant in range(3):
        assert names[f"efficientnet_lite{variant}"] == "autotransfer-efficientnet-lite"


def test_lite0_passes_the_plugin_contract_checks() -> None:
    from autotransfer.testing import check_backbone

    results = {check.name: check.status for check in check_backbone("efficientnet_lite0")}
    assert results["weights"] == results["preprocessing"] == "PASS", results  # real weights, a cat is a cat
