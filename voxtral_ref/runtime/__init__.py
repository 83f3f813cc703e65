"""What runs the stages fast and live: kernel dispatch (NumPy twins / C), quantised weights, stream sessions."""
