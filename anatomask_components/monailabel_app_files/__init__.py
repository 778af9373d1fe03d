"""Files of the MONAI Label app that ``anatomask export-monailabel-app`` writes (see
:mod:`anatomask_components.monailabel_app`). They run inside MONAI Label 0.8.5 and import ``monailabel``; this
package only stores them and nothing imports them from here."""
