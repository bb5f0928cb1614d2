"""libvirtfs.nodes"""
