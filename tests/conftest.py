import os
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# The tests use tiny models, for which one intra-op thread is fastest, and a busy 2-core machine
# with two threads per process slows down several-fold.
torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """Unregister the strategies a test registers."""
    from helpers import restored

    from auxlab.generators import GENERATORS

    with restored(GENERATORS):
        yield
