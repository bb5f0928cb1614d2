"""libvirtfs.mount"""
