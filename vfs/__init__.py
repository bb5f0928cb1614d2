"""libvirtfs.vfs"""
