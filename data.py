"""Samples, modality tags, training data and prompts (being written: see issue 3)."""
MODALITIES = (
    "X_RAY", "MICROSCOPY", "CLINICAL_PHOTOGRAPHY", "CT_SCAN", "GRAPHICS", "ANGIOGRAPHY",
    "PET_SCAN", "ULTRASOUND", "MRI_SCAN", "FUNDUS_PHOTOGRAPHY", "OCT_SCAN", "ENDOSCOPY",
    "MAMMOGRAPHY", "FLUOROSCOPY", "OTHER", "SPECT",
)
