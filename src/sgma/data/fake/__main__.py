"""``python -m sgma.data.fake DATASET DIR``."""

from sgma.data.fake import main

main()
