"""glassbox.inference"""
