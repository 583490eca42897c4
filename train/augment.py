"""Light augmentation for chest radiographs, applied to [0, 1] float tensors before the model.

Kept deliberately mild: a radiograph's diagnostic content is in fine texture and position, so strong
crops, shears or colour changes would teach the model images it never sees at deployment.
No horizontal flip: chest films have a fixed left/right anatomy (heart and aortic knob on the patient's
left, gastric bubble under the left hemidiaphragm, side markers burned into the film); a mirrored film
is an image that does not occur in practice and would blur those cues.
"""

from __future__ import annotations

from train.spec import PreprocessSpec


def train_augment(spec: PreprocessSpec):
    """Small rotation/translation/scale and mild brightness/contrast; output stays in [0, 1]."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.93, 1.07),
                        interpolation=InterpolationMode.BILINEAR, fill=0.0),
        # float images are clamped to [0, 1] by v2's brightness/contrast kernels
        v2.ColorJitter(brightness=0.1, contrast=0.1),
    ])
