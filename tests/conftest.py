import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random init saved to a file (its constructor would download
    the real weights; the test suite never downloads)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

    class RandomInception(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random init

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        net = RandomInception("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return path
