"""libvirtfs.drivers"""
