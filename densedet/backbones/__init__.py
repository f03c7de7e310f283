from .resnet import BasicBlock, Bottleneck, FrozenBatchNorm2d, ResNet, load_torchvision_resnet, make_norm

__all__ = ["BasicBlock", "Bottleneck", "FrozenBatchNorm2d", "ResNet", "load_torchvision_resnet", "make_norm"]
