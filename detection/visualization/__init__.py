"""Pictures: detections drawn on images (`draw`) and PNG plots of training curves and
precision-recall curves (`plots`). Depends on no other part of the project."""
