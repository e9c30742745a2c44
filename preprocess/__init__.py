"""Query preprocessing: the overlay detector (a YOLO model trained on synthetic pastes) and the
crops it gives to the crop branches."""
