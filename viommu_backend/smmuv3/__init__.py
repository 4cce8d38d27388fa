"""smmuv3"""
