"""Sample images while a LoRA trains: prompts (kohya's file format), samplers, PNG files with A1111's
metadata, the contact sheet, and the round that ties them to a family's renderer. Family-independent."""
