import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

# No test may depend on wall-clock speed (speed belongs in bench/): hypothesis' default 200 ms
# deadline fails a property test on a busy machine, so every test of the suite runs without one.
settings.register_profile("convspec", deadline=None)
settings.load_profile("convspec")
