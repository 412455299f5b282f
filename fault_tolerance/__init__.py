"""glassbox.fault_tolerance"""
