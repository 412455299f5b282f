"""glassbox.elastic"""
