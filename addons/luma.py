"""mitmproxy entry point: ``mitmdump -s addons/luma.py`` or ``mitmweb -s addons/luma.py``."""

import sys
from pathlib import Path

# Let the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from luma_proxy.proxy.composition import all_addons

addons = all_addons()
