from .fpn import FPN, BackboneWithFPN, LastLevelP6P7

__all__ = ["FPN", "BackboneWithFPN", "LastLevelP6P7"]
