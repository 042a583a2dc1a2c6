"""A calibration's measuring process: python -m pipeline.estimate SIZE ITERATIONS NETWORK
PRECISION METHOD HISTORY STYLE prints one JSON line (calibration.measure)."""

import json
import sys

from pipeline.estimate.calibration import measure

size, iterations, network, precision, method, history, style = sys.argv[1:8]
print(json.dumps(measure(int(size), int(iterations), network, precision, method, int(history),
                         int(style))))
