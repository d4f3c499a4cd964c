"""The cascade's three stages and the constants every part of the package shares.

One source of truth for the stage names, their input sizes (paper Fig. 2), the training sample
labels (the original training code's), the landmark order and the detector's defaults
(detect_face.m). Plain Python values: importing this module imports nothing else.
"""

STAGES = ("pnet", "rnet", "onet")
INPUT_SIZE = {"pnet": 12, "rnet": 24, "onet": 48}  # the side of each net's square input, in pixels

# The three tasks each net learns (paper Sec. 2.3): face classification, box regression, landmarks.
TASKS = ("cls", "box", "landmark")

# Sample labels. Negatives and positives train classification; positives and parts train the box;
# landmark faces train the landmarks only.
NEGATIVE, POSITIVE, PART, LANDMARK = 0, 1, -1, -2
LABEL = {"negative": NEGATIVE, "positive": POSITIVE, "part": PART, "landmark": LANDMARK}
SAMPLE_TYPES = tuple(LABEL)
LABELS = tuple(LABEL.values())

# Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner. Mirroring an
# image swaps the eyes and the mouth corners.
FLIP_POINTS = (1, 0, 2, 4, 3)

# The detector's defaults (detect_face.m): the smallest face searched for, the pyramid's step, and
# the score thresholds of P-Net, R-Net and O-Net.
MIN_FACE_SIZE = 20.0
SCALE_FACTOR = 0.709
THRESHOLDS = (0.6, 0.7, 0.7)
