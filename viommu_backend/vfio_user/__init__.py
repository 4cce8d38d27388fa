"""vfio_user"""
