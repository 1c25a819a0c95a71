"""python -m gradcam_batch.report OUTPUT_DIR: the same as gradcam-batch-report."""

import sys

from gradcam_batch.report.cli import main

sys.exit(main())
