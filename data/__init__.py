"""glassbox.data"""
