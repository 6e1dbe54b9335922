"""ditscale.data defers streaming's dataset zoo (ditscale/data/streaming_zoo.py): importing streaming after it
loads none of torchvision / scikit-learn / the tokenizers, and the zoo still works when asked for."""

import subprocess
import sys

SCRIPT = """
import sys
import ditscale.data
import streaming
from streaming import MDSWriter, StreamingDataset
heavy = sorted(m for m in ("torchvision", "sklearn", "streaming.text.c4", "streaming.vision.coco") if m in sys.modules)
print("heavy:", heavy)
from streaming.vision import StreamingCIFAR10
assert streaming.vision.StreamingCIFAR10 is StreamingCIFAR10 is sys.modules["streaming.vision"].StreamingCIFAR10
import streaming.vision.coco
print("zoo:", StreamingCIFAR10.__module__, streaming.vision.coco.StreamingCOCO.__name__)
"""


def test_streaming_zoo_loads_only_when_used():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "heavy: []" in out.stdout, out.stdout
    assert "zoo: streaming.vision.cifar10 StreamingCOCO" in out.stdout, out.stdout
